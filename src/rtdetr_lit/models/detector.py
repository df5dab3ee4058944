"""The whole detector: backbone -> hybrid encoder -> decoder, with the switches users turn."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rtdetr_lit.models.backbone import PResNet
from rtdetr_lit.models.decoder import RTDETRTransformer
from rtdetr_lit.models.deploy import fuse_for_deploy
from rtdetr_lit.models.encoder import HybridEncoder
from rtdetr_lit.sizes import check_sizes

__all__ = ["RTDETR"]


class RTDETR(nn.Module):
    """RT-DETRv2. State-dict keys are the reference's (``backbone.``, ``encoder.``, ``decoder.``).

    ``forward(images)`` in eval mode: ``images`` float (B, 3, H, W) in [0, 1], H and W multiples of
    32, returns ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4) normalised cxcywh.
    ``forward(images, targets)`` in training mode: ``targets`` is a list of dicts with ``labels``
    (N,) int64 and ``boxes`` (N, 4) normalised cxcywh; the output also holds ``aux_outputs``,
    ``enc_outputs``, ``dn_outputs`` and ``dn_meta`` for the loss (see ``RTDETRTransformer``).
    """

    # Set by ``create_model``: the size name and the ``ModelSpec`` the model was built from.
    size_name: str | None = None
    spec: Any = None

    def __init__(self, backbone: PResNet, encoder: HybridEncoder, decoder: RTDETRTransformer):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder

    def forward(
        self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        check_sizes(images.shape[-2:], "image height and width")
        return self.decoder(self.encoder(self.backbone(images)), targets)

    @property
    def eval_idx(self) -> int:
        """The last decoder layer run at inference (-1 = the last layer). Settable on a trained
        model: fewer layers trade accuracy for speed without retraining."""
        return self.decoder.eval_idx

    @eval_idx.setter
    def eval_idx(self, value: int) -> None:
        self.decoder.eval_idx = value

    @property
    def sampling_method(self) -> str:
        return self.decoder.sampling_method

    @property
    def discrete_snap(self) -> str:
        return self.decoder.discrete_snap

    def set_sampling_method(self, method: str, discrete_snap: str | None = None) -> RTDETR:
        """Switch every decoder cross-attention to ``"grid_sample"`` or ``"discrete"`` sampling.

        Discrete sampling has no gradient for the sampling offsets, so they stop training; the
        state-dict keys do not change. ``discrete_snap``, when given, sets which pixel a discrete
        point reads: ``"reference"`` (the reference code's ``int(x * W + 0.5)``, half a pixel right
        of and below the point) or ``"centre"`` (the pixel whose centre is nearest, the one
        ``grid_sample`` weighs most).
        """
        self.decoder.set_sampling_method(method, discrete_snap)
        return self

    @property
    def channels_last(self) -> bool:
        """Whether convolution weights are stored channels-last (NHWC), so every feature map is.

        ``create_model`` turns it on: oneDNN on CPUs and cuDNN on GPUs run convolutions fastest in
        this layout (measured in BENCHMARKS.md). Outputs and state-dict keys do not depend on it;
        input images may come in either layout.
        """
        stem = self.backbone.conv1[0].conv.weight
        return stem.is_contiguous(memory_format=torch.channels_last)

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self.to(memory_format=torch.channels_last if value else torch.contiguous_format)

    def deploy(self) -> RTDETR:
        """Switch to eval mode and fuse RepVGG blocks and conv+BN pairs (same outputs, faster).

        The fused convolutions keep the model's memory layout (:attr:`channels_last`).
        """
        layout = self.channels_last
        self.eval()
        fuse_for_deploy(self)
        self.channels_last = layout
        return self
