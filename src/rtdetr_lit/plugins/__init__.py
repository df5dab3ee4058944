"""Lightning plugins: the safe, atomic checkpoint IO and batch-norm synchronisation for CPU DDP."""

from rtdetr_lit.plugins.checkpoint_io import SafeCheckpointIO, ensure_safe_checkpoint_io
from rtdetr_lit.plugins.sync_batchnorm import AllReduceBatchNorm, SyncBatchNormCPU

__all__ = [
    "AllReduceBatchNorm",
    "SafeCheckpointIO",
    "SyncBatchNormCPU",
    "ensure_safe_checkpoint_io",
]
