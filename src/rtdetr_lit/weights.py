"""Released RT-DETRv2 weights by name: one table, and where each file lives in the local cache.

``python -m rtdetr_lit.weights list`` shows the table (name, model sizes, kind, paper AP, whether
the file is cached); ``python -m rtdetr_lit.weights path NAME`` prints the file's place in the
cache: ``$RTDETR_LIT_HOME`` when set, else ``rtdetr_lit`` under the user's cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache``).

The detector files are the reference implementation's releases (its ``rtdetrv2_pytorch`` model
zoo; APs are COCO val2017, docs/rtdetrv2.md §1); the ImageNet backbones are what the reference
loads for ``pretrained: True``; the Hugging Face entries are ``model.safetensors`` of the
``PekingU`` hub repositories, in HF's key layout.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["KINDS", "REGISTRY", "WeightsEntry", "cache_dir", "cached_path", "entry", "main"]

_RELEASES = "https://github.com/lyuwenyu/storage/releases/download/"
_HUB = "https://huggingface.co/{repo}/resolve/main/model.safetensors"

KINDS = {
    "coco": "detector trained on COCO",
    "coco-discrete": "detector fine-tuned with discrete sampling on COCO",
    "coco-points": "detector of the sampling-points ablation on COCO",
    "imagenet": "ImageNet backbone",
}


@dataclass(frozen=True)
class WeightsEntry:
    """One released file.

    Attributes:
        name: what users type (``model.init_from=NAME``, ``rtdetr_lit.load(NAME)``).
        url: where the file is downloaded from.
        models: the zoo sizes the file fits.
        kind: a key of :data:`KINDS`.
        ap: the paper's COCO val2017 AP for detectors, ``None`` where there is none.
        layout: ``"reference"`` (the reference implementation's keys) or ``"hf"``.
        sha256: the file's checksum when known; otherwise recorded on first download.
    """

    name: str
    url: str
    models: tuple[str, ...]
    kind: str
    ap: float | None = None
    layout: str = "reference"
    sha256: str | None = None

    @property
    def file_name(self) -> str:
        """The cached file's name: the entry's name with the URL's suffix."""
        return self.name + Path(urlparse(self.url).path).suffix


def _release(name: str, path: str, models: tuple[str, ...], kind: str, ap: float | None = None):
    return WeightsEntry(name, _RELEASES + path, models, kind, ap)


def _hub(name: str, repo: str, model: str, ap: float) -> WeightsEntry:
    return WeightsEntry(name, _HUB.format(repo=repo), (model,), "coco", ap, layout="hf")


REGISTRY: tuple[WeightsEntry, ...] = (
    _release(
        "rtdetrv2_r18_coco", "v0.2/rtdetrv2_r18vd_120e_coco_rerun_48.1.pth", ("r18",), "coco", 48.1
    ),
    _release("rtdetrv2_r18_coco_v0.1", "v0.1/rtdetrv2_r18vd_120e_coco.pth", ("r18",), "coco"),
    _release("rtdetrv2_r34_coco", "v0.1/rtdetrv2_r34vd_120e_coco_ema.pth", ("r34",), "coco", 49.9),
    _release(
        "rtdetrv2_r50m_coco", "v0.1/rtdetrv2_r50vd_m_7x_coco_ema.pth", ("r50m",), "coco", 51.9
    ),
    _release("rtdetrv2_r50_coco", "v0.1/rtdetrv2_r50vd_6x_coco_ema.pth", ("r50",), "coco", 53.4),
    _release(
        "rtdetrv2_r101_coco",
        "v0.1/rtdetrv2_r101vd_6x_coco_from_paddle.pth",
        ("r101",),
        "coco",
        54.3,
    ),
    _release(
        "rtdetrv2_r18_coco_discrete",
        "v0.1/rtdetrv2_r18vd_dsp_3x_coco.pth",
        ("r18",),
        "coco-discrete",
        47.4,
    ),
    # (sic: the release file's name starts with a double r)
    _release(
        "rtdetrv2_r34_coco_discrete",
        "v0.1/rrtdetrv2_r34vd_dsp_1x_coco.pth",
        ("r34",),
        "coco-discrete",
        49.2,
    ),
    _release(
        "rtdetrv2_r50m_coco_discrete",
        "v0.1/rtdetrv2_r50vd_m_dsp_3x_coco.pth",
        ("r50m",),
        "coco-discrete",
        51.4,
    ),
    _release(
        "rtdetrv2_r50_coco_discrete",
        "v0.1/rtdetrv2_r50vd_dsp_1x_coco.pth",
        ("r50",),
        "coco-discrete",
        52.9,
    ),
    *(
        _release(
            f"rtdetrv2_r18_coco_points{k}",
            f"v0.1/rtdetrv2_r18vd_sp{k}_120e_coco.pth",
            ("r18",),
            "coco-points",
            ap,
        )
        for k, ap in ((1, 47.3), (2, 47.7), (3, 47.8))
    ),
    _release(
        "resnet18vd_imagenet", "v0.1/ResNet18_vd_pretrained_from_paddle.pth", ("r18",), "imagenet"
    ),
    _release(
        "resnet34vd_imagenet", "v0.1/ResNet34_vd_pretrained_from_paddle.pth", ("r34",), "imagenet"
    ),
    _release(
        "resnet50vd_imagenet",
        "v0.1/ResNet50_vd_ssld_v2_pretrained_from_paddle.pth",
        ("r50m", "r50"),
        "imagenet",
    ),
    _release(
        "resnet101vd_imagenet",
        "v0.1/ResNet101_vd_ssld_pretrained_from_paddle.pth",
        ("r101",),
        "imagenet",
    ),
    _hub("rtdetrv2_r18_coco_hf", "PekingU/rtdetr_v2_r18vd", "r18", 48.1),
    _hub("rtdetrv2_r34_coco_hf", "PekingU/rtdetr_v2_r34vd", "r34", 49.9),
    _hub("rtdetrv2_r50_coco_hf", "PekingU/rtdetr_v2_r50vd", "r50", 53.4),
    _hub("rtdetrv2_r101_coco_hf", "PekingU/rtdetr_v2_r101vd", "r101", 54.3),
)


def entry(name: str) -> WeightsEntry:
    """The registry entry ``name``; a ``ValueError`` listing the names otherwise."""
    for item in REGISTRY:
        if item.name == name:
            return item
    import difflib

    close = difflib.get_close_matches(name, [e.name for e in REGISTRY], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"no weights named {name!r}{hint}; `python -m rtdetr_lit.weights list` shows them all"
    )


def cache_dir() -> Path:
    """``$RTDETR_LIT_HOME``, else ``rtdetr_lit`` under ``$XDG_CACHE_HOME`` (or ``~/.cache``)."""
    home = os.environ.get("RTDETR_LIT_HOME")
    if home:
        return Path(home).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rtdetr_lit"


def cached_path(name: str) -> Path:
    """Where the file of ``name`` lives in the cache (whether it is there or not)."""
    return cache_dir() / entry(name).file_name


def _table() -> str:
    rows = [("name", "models", "kind", "AP", "cached")]
    for item in REGISTRY:
        ap = f"{item.ap:.1f}" if item.ap is not None else "-"
        cached = "yes" if (cache_dir() / item.file_name).is_file() else "no"
        kind = item.kind + (" (HF layout)" if item.layout == "hf" else "")
        rows.append((item.name, ",".join(item.models), kind, ap, cached))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtdetr_lit.weights list|path NAME``."""
    parser = argparse.ArgumentParser(
        prog="python -m rtdetr_lit.weights", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the table of names, with what is cached")
    path = commands.add_parser("path", help="where NAME's file lives in the cache")
    path.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(_table())
        print(f"\ncache: {cache_dir()}")
        return 0
    try:
        print(cached_path(args.name))
    except ValueError as err:
        parser.exit(2, f"{err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
