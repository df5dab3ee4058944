"""PResNet: the ResNet-"vd" backbone of RT-DETRv2 (docs/rtdetrv2.md §2).

"vd" means a three-conv stem and, in strided stages, an average-pool before the 1x1 projection
shortcut (so the shortcut sees every input pixel instead of one in four). Attribute names fix the
state-dict keys to the reference layout (``conv1.conv1_1``, ``res_layers.{i}.blocks.{j}.branch2a``,
...), so reference backbone weights load by name.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtdetr_lit.checkpoints import check_finite, extract_state_dict, load_checkpoint_file
from rtdetr_lit.models.common import ConvNormLayer, freeze_batch_norm

__all__ = ["PRESNET_DEPTHS", "BasicBlock", "BottleNeck", "PResNet"]

log = logging.getLogger(__name__)

# depth -> (block type, blocks per stage)
PRESNET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (4, 8, 16, 32)  # output stride of each stage (the stem already divides by 4)


def _shortcut(ch_in: int, ch_out: int, stride: int) -> nn.Module:
    """1x1 projection shortcut; strided ones average-pool first (the "d" variant)."""
    if stride == 1:
        return ConvNormLayer(ch_in, ch_out, 1)
    return nn.Sequential(
        OrderedDict(
            pool=nn.AvgPool2d(2, 2, 0, ceil_mode=True),
            conv=ConvNormLayer(ch_in, ch_out, 1),
        )
    )


class BasicBlock(nn.Module):
    """3x3 (with the stride) -> 3x3, residual add, ReLU. Output width ``ch_out``."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool) -> None:
        super().__init__()
        # Defined before the branches so the state-dict key order follows the reference tsv.
        self.short = _shortcut(ch_in, ch_out, stride) if project else None
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act="relu")
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.short is None else self.short(x)
        return F.relu(self.branch2b(self.branch2a(x)) + identity, inplace=True)


class BottleNeck(nn.Module):
    """1x1 -> 3x3 (with the stride) -> 1x1 expanding x4, residual add, ReLU."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool) -> None:
        super().__init__()
        width = ch_out
        self.branch2a = ConvNormLayer(ch_in, width, 1, act="relu")
        self.branch2b = ConvNormLayer(width, width, 3, stride, act="relu")
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1)
        self.short = _shortcut(ch_in, ch_out * self.expansion, stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.short is None else self.short(x)
        return F.relu(self.branch2c(self.branch2b(self.branch2a(x))) + identity, inplace=True)


class _Stage(nn.Module):
    """A run of residual blocks; only the first one strides and projects its shortcut."""

    def __init__(self, block: type[nn.Module], ch_in: int, ch_out: int, count: int, stride: int):
        super().__init__()
        blocks = []
        for i in range(count):
            # The first block always projects, even when widths already match (r18/r34 stage 0):
            # the reference checkpoints contain that projection.
            blocks.append(block(ch_in, ch_out, stride if i == 0 else 1, project=i == 0))
            ch_in = ch_out * block.expansion
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PResNet(nn.Module):
    """ResNet-vd backbone returning the feature maps of the stages in ``return_idx``.

    Args:
        depth: 18, 34, 50 or 101.
        return_idx: stages to return (0..3); stage i has stride ``4 * 2**i``.
        freeze_at: -1 freezes nothing; 0 freezes the stem; k > 0 also the first k stages.
        freeze_norm: replace every BatchNorm2d by a frozen BN (affine + statistics as buffers).
        weights: optional local path to backbone weights (see :meth:`load_weights`).

    ``forward(x)`` takes images (B, 3, H, W) float and returns a list of maps
    (B, out_channels[k], H / out_strides[k], W / out_strides[k]), one per entry of ``return_idx``.
    """

    def __init__(
        self,
        depth: int,
        return_idx: Sequence[int] = (1, 2, 3),
        freeze_at: int = -1,
        freeze_norm: bool = False,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if depth not in PRESNET_DEPTHS:
            raise ValueError(
                f"unsupported PResNet depth {depth}; choose from {list(PRESNET_DEPTHS)}"
            )
        if any(i not in range(4) for i in return_idx):
            raise ValueError(f"return_idx must index stages 0..3, got {list(return_idx)}")
        kind, counts = PRESNET_DEPTHS[depth]
        block = BasicBlock if kind == "basic" else BottleNeck
        self.return_idx = list(return_idx)

        self.conv1 = nn.Sequential(
            OrderedDict(
                conv1_1=ConvNormLayer(3, 32, 3, 2, act="relu"),
                conv1_2=ConvNormLayer(32, 32, 3, 1, act="relu"),
                conv1_3=ConvNormLayer(32, 64, 3, 1),  # its ReLU runs after the pool
            )
        )
        self.pool = nn.MaxPool2d(3, 2, 1)

        stages, ch_in, stage_channels = [], 64, []
        for i, (width, count) in enumerate(zip(_STAGE_WIDTHS, counts, strict=True)):
            stages.append(_Stage(block, ch_in, width, count, stride=1 if i == 0 else 2))
            ch_in = width * block.expansion
            stage_channels.append(ch_in)
        self.res_layers = nn.ModuleList(stages)

        self.out_channels: list[int] = [stage_channels[i] for i in self.return_idx]
        self.out_strides: list[int] = [_STAGE_STRIDES[i] for i in self.return_idx]

        if freeze_at >= 0:
            self._freeze(self.conv1)
            for stage in self.res_layers[: min(freeze_at, len(self.res_layers))]:
                self._freeze(stage)
        if freeze_norm:
            freeze_batch_norm(self)
        if weights is not None:
            self.load_weights(weights)

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        for p in module.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # conv -> BN -> ReLU -> max-pool, computed as ReLU(max-pool(.)): the two commute exactly
        # (values and gradients), and the ReLU and its backward then touch a map 4x smaller
        x = F.relu(self.pool(self.conv1(x)), inplace=True)
        outs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs

    def load_weights(self, path: str | Path) -> None:
        """Load backbone weights from a local file (nothing is downloaded, no code in it runs).

        The file may hold a bare backbone state dict, a state dict whose backbone keys start with
        ``backbone.`` (other keys are ignored), or a reference checkpoint with ``ema.module`` or
        ``model`` (docs/rtdetrv2.md §10). ``num_batches_tracked`` entries are optional. Raises
        ``FileNotFoundError`` if the file is missing and ``ValueError`` naming missing, unexpected
        or mis-shaped keys.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        loaded = load_checkpoint_file(path)
        try:
            state = extract_state_dict(loaded)
        except ValueError as err:
            raise ValueError(f"backbone weights {path}: {err}") from None
        prefix = "backbone."  # a whole detector's weights: keep its backbone's
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        check_finite(state, f"backbone weights {path}")

        own = {k: v for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        missing = sorted(own.keys() - given.keys())
        unexpected = sorted(given.keys() - own.keys())
        mis_shaped = [
            f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own.keys() & given.keys()
            if given[k].shape != own[k].shape
        ]
        if missing or unexpected or mis_shaped:
            raise ValueError(
                f"backbone weights in {path} do not fit PResNet: "
                f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
                f"shape mismatches {mis_shaped[:10]}"
            )
        # strict=False only tolerates num_batches_tracked, which the checks above exempted.
        self.load_state_dict(state, strict=False)
        log.info("loaded backbone weights from %s", path)
