"""Deploy-time fusion: fold normalisation into convolutions and re-parameterise RepVGG blocks.

Both rewrites are exact in eval mode (the norms use their running statistics), remove every
BatchNorm from the conv paths and shorten the exported graph.
"""

from __future__ import annotations

import itertools
import logging

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rtdetr_lit.models.common import ConvNormLayer, fuse_conv_norm
from rtdetr_lit.models.encoder import RepVggBlock

__all__ = ["fuse_for_deploy"]

log = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def fuse_for_deploy(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place for inference and return it.

    1. Every :class:`RepVggBlock` becomes a single 3x3 conv with bias (``RepVggBlock.fuse``).
    2. Every :class:`ConvNormLayer` gets its norm folded into the conv (which gains a bias) and its
       ``norm`` replaced by ``nn.Identity``; so does every Conv2d directly followed by a norm inside
       an ``nn.Sequential``.

    The model is put in eval mode first: fusion bakes in the running statistics, which only eval
    mode uses. The state-dict keys of fused parts change, so load weights before fusing.
    """
    if model.training:
        log.info("fuse_for_deploy: switching the model to eval mode")
    model.eval()

    rep_blocks = [m for m in model.modules() if isinstance(m, RepVggBlock)]
    for block in rep_blocks:
        block.fuse()

    folded = 0
    for module in list(model.modules()):
        if isinstance(module, ConvNormLayer) and isinstance(module.norm, _NORMS):
            module.conv = fuse_conv_norm(module.conv, module.norm)
            module.norm = nn.Identity()
            folded += 1
        elif isinstance(module, nn.Sequential):
            folded += _fold_sequential(module)
    log.info("fused %d RepVGG blocks and folded %d norms into convs", len(rep_blocks), folded)
    return model


def _fold_sequential(seq: nn.Sequential) -> int:
    """Fold each (Conv2d, norm) pair of consecutive children of ``seq``; returns the pair count."""
    names = list(seq._modules)
    count = 0
    for first, second in itertools.pairwise(names):
        conv, norm = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, _NORMS):
            setattr(seq, first, fuse_conv_norm(conv, norm))
            setattr(seq, second, nn.Identity())
            count += 1
    return count
