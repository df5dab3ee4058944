"""Released RT-DETRv2 weights by name: one table, a local cache, and the download that fills it.

A name works wherever a weights path does: ``model.init_from=rtdetrv2_r18_coco``,
``model.net.backbone_weights=imagenet`` (the ImageNet backbone of the model's size),
``ckpt_path=rtdetrv2_r50_coco`` of eval, export and predict,
``rtdetr_lit.load("rtdetrv2_r50_coco")``.

``python -m rtdetr_lit.weights`` has four commands: ``list`` (name, model sizes, kind, paper AP,
cached or not), ``download NAME``, ``import NAME FILE`` (a file fetched by hand on another machine)
and ``path NAME`` (the file's place in the cache).

The cache is ``$RTDETR_LIT_HOME`` when set, else ``rtdetr_lit`` under the user's cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache``). A file enters it only whole and checked: downloaded with
``torch.hub.download_url_to_file`` (a progress bar on stderr) into a temporary folder beside it,
read without running code, matched key by key against the model it is for, and only then renamed
into place, with its SHA-256 in ``NAME.<suffix>.sha256``. Every later use compares the file with
that checksum (and with the registry's, where the registry knows it) and never touches the
network. A file lock makes concurrent users of one cache (the ranks of a DDP job) download a file
once: the others wait, then read it.

``$RTDETR_LIT_MIRROR`` replaces the two origins (the reference's GitHub releases and
``https://huggingface.co``) by one base URL, for clusters that serve a copy of the files;
``$HF_ENDPOINT`` alone moves the hub files, as it does for Hugging Face's own tools.

The detector files are the reference implementation's releases (its ``rtdetrv2_pytorch`` model
zoo; APs are COCO val2017, docs/rtdetrv2.md §1); the ImageNet backbones are what the reference
loads for ``pretrained: True``; the Hugging Face entries are ``model.safetensors`` of the
``PekingU`` hub repositories, in HF's key layout (converted when read, docs/rtdetrv2.md §10).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from rtdetr_lit.checkpoints import (
    align_to_target,
    atomic_write,
    current_umask,
    load_checkpoint_file,
    model_state_dict,
)
from rtdetr_lit.config import ConfigError

if TYPE_CHECKING:
    from rtdetr_lit.record import ModelRecord

__all__ = [
    "KINDS",
    "REGISTRY",
    "WeightsEntry",
    "WeightsError",
    "backbone_file",
    "cache_dir",
    "cached_path",
    "entry",
    "fetch",
    "import_file",
    "is_name",
    "main",
    "read_weights",
    "record_for",
]

log = logging.getLogger(__name__)

_RELEASES = "https://github.com/lyuwenyu/storage/releases/download/"
_HF = "https://huggingface.co/"
_HUB = _HF + "{repo}/resolve/main/model.safetensors"
# Seconds without an answer before a download gives up (urllib waits forever otherwise).
_TIMEOUT = 60.0

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


class WeightsError(ConfigError):
    """A weights name that cannot be served: not cached and not downloadable, or a file that is
    not the weights it should be."""


def entry(name: str) -> WeightsEntry:
    """The registry entry ``name``; a :class:`WeightsError` listing close names otherwise."""
    for item in REGISTRY:
        if item.name == name:
            return item
    import difflib

    close = difflib.get_close_matches(name, [e.name for e in REGISTRY], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise WeightsError(
        f"no weights named {name!r}{hint}; `python -m rtdetr_lit.weights list` shows them all"
    )


def is_name(value: str | os.PathLike[str] | None) -> bool:
    """Whether ``value`` names a registry entry (a name, not a path: names have no suffix)."""
    return isinstance(value, str) and any(item.name == value for item in REGISTRY)


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


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def download_url(item: WeightsEntry) -> str:
    """``item.url``, or the same file under ``$RTDETR_LIT_MIRROR`` when that is set (and a hub
    file under ``$HF_ENDPOINT``, Hugging Face's own mirror setting)."""
    mirror = os.environ.get("RTDETR_LIT_MIRROR")
    if not mirror and item.layout == "hf":
        mirror = os.environ.get("HF_ENDPOINT")
    if not mirror:
        return item.url
    for origin in (_RELEASES, _HF):
        if item.url.startswith(origin):
            return mirror.rstrip("/") + "/" + item.url[len(origin) :]
    return item.url


# -- the cache ----------------------------------------------------------------------------------
def fetch(name: str, progress: bool = True) -> Path:
    """The checked file of ``name`` in the cache, downloaded first if it is not there.

    Raises:
        WeightsError: unknown name; not cached and the download failed (the message says where
            to place the file by hand); the downloaded or cached file is not ``name``'s weights
            (unreadable, an HTML page, another model size, a checksum that differs).
    """
    item = entry(name)
    path = cache_dir() / item.file_name
    if path.is_file():
        _verify(item, path)
        return path
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(f".{path.name}.lock")))
    try:
        lock.acquire(timeout=0.1)
    except Timeout:
        log.info("another process is downloading %s into %s: waiting for it", name, path.parent)
        lock.acquire()
    try:
        if path.is_file():  # another process fetched it while this one waited
            _verify(item, path)
            return path
        with tempfile.TemporaryDirectory(prefix=f".{item.name}.", dir=path.parent) as tmp:
            _admit(item, _download(item, Path(tmp), progress), path)
    finally:
        lock.release()
    return path


def import_file(name: str, source: str | os.PathLike[str]) -> Path:
    """Put ``source``, a copy of ``name``'s release file fetched by hand, into the cache after the
    same checks a download gets; returns its place in the cache."""
    item = entry(name)
    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightsError(f"import {name}: no such file {source}")
    path = cache_dir() / item.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{item.name}.", dir=path.parent) as tmp:
        copy = Path(tmp) / item.file_name
        shutil.copyfile(source, copy)
        _admit(item, copy, path, origin=str(source))
    return path


def _download(item: WeightsEntry, folder: Path, progress: bool) -> Path:
    """Download ``item`` into ``folder``; a :class:`WeightsError` with the offline instructions
    when the file cannot be fetched."""
    import torch.hub

    url = download_url(item)
    target = folder / item.file_name
    log.info("downloading %s from %s", item.name, url)
    try:
        with _socket_timeout(_TIMEOUT):
            torch.hub.download_url_to_file(url, str(target), progress=progress)
    except Exception as err:  # urllib and http.client raise many kinds
        raise _offline_error(item, url, err) from None
    return target


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _offline_error(item: WeightsEntry, url: str, err: Exception) -> WeightsError:
    path = cache_dir() / item.file_name
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return WeightsError(
        f"{item.name} is not in the cache and could not be downloaded ({reason}). On a machine "
        f"with internet, download {url} and either save it as {path.name} in {path.parent} or "
        f"run: python -m rtdetr_lit.weights import {item.name} FILE"
    )


def _admit(item: WeightsEntry, file: Path, path: Path, origin: str | None = None) -> None:
    """Check the fetched ``file`` (see :func:`_check`), then rename it to ``path`` with its
    checksum beside it. A file that fails stays out of the cache (its folder is temporary)."""
    origin = origin or download_url(item)
    digest = _check(item, file, f"{item.name} from {origin}")
    os.chmod(file, 0o666 & ~current_umask())
    os.replace(file, path)
    _record_checksum(path, digest)
    log.info("cached %s as %s (SHA-256 %s)", item.name, path, digest)


def _record_checksum(path: Path, digest: str) -> None:
    atomic_write(_checksum_path(path), lambda f: f.write(f"{digest}\n".encode()))


def _verify(item: WeightsEntry, path: Path) -> None:
    """Compare a cached file with the checksum recorded when it entered the cache. A file placed
    by hand (no checksum yet) is checked like a download and its checksum recorded."""
    recorded_file = _checksum_path(path)
    if not recorded_file.is_file():
        _record_checksum(path, _check(item, path, f"{item.name} ({path}, placed by hand)"))
        return
    recorded = recorded_file.read_text().strip()
    digest = _sha256(path)
    if digest != recorded:
        raise WeightsError(
            f"{path}: the file changed since it entered the cache (SHA-256 {digest}, recorded "
            f"{recorded}): it is damaged or was replaced. Remove it and fetch it again: rm "
            f"{path} {recorded_file} && python -m rtdetr_lit.weights download {item.name}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")


def _check(item: WeightsEntry, file: Path, source: str) -> str:
    """Check that ``file`` holds ``item``'s weights and return its SHA-256.

    In order: not a web page, the registry's checksum when it has one, readable without running
    code, and every tensor's name and shape fits the model size the entry is for.
    """
    with open(file, "rb") as f:
        start = f.read(512).lstrip().lower()
    if start.startswith(_HTML_STARTS):
        raise WeightsError(
            f"{source}: the server sent a web page, not weights (an error or login page?); "
            "nothing was kept in the cache"
        )
    digest = _sha256(file)
    if item.sha256 is not None and digest != item.sha256:
        raise WeightsError(
            f"{source}: SHA-256 {digest} differs from the released file's {item.sha256}; "
            "nothing was kept in the cache"
        )
    try:
        _fit(item, file)
    except (ValueError, FileNotFoundError) as err:
        raise WeightsError(
            f"{source} is not {item.name}'s weights for model {'/'.join(item.models)}: {err}. "
            "Nothing was kept in the cache"
        ) from None
    return digest


def _fit(item: WeightsEntry, file: Path) -> None:
    """Match ``file`` key by key against the model(s) ``item`` is for (``ValueError`` if not)."""
    if item.kind == "imagenet":
        from rtdetr_lit.models.backbone import PResNet
        from rtdetr_lit.models.zoo import MODEL_SIZES

        for depth in sorted({MODEL_SIZES[m].backbone_depth for m in item.models}):
            PResNet(depth).load_weights(file)
        return
    state = _our_layout(item, load_checkpoint_file(file))
    target = record_for(item).build_net().state_dict()
    align_to_target(model_state_dict(state), target, source="the file")


def _our_layout(item: WeightsEntry, contents: Any) -> Any:
    """The loaded file in this package's key layout (HF files are converted)."""
    if item.layout != "hf":
        return contents
    from rtdetr_lit.convert import convert_hf_state_dict

    return convert_hf_state_dict(contents, item.models[0]).state_dict


# -- names where paths are accepted ---------------------------------------------------------
def read_weights(value: str | os.PathLike[str], model: str | None = None) -> tuple[Any, str]:
    """The contents of a weights file and how to name it in messages: a registry name's cached
    file (fetched when needed, in this package's key layout) or a local path.

    ``model``, when given, is the zoo size the weights are for: a name made for another size is
    a :class:`WeightsError` before anything is read.
    """
    if not is_name(value):
        return load_checkpoint_file(value), str(value)
    item = entry(str(value))
    if item.kind == "imagenet":
        raise WeightsError(
            f"{item.name} is an ImageNet backbone, not a detector: give it as "
            f"model.net.backbone_weights={item.name} (or =imagenet)"
        )
    if model is not None and model not in item.models:
        raise WeightsError(_other_size(item, model))
    return _our_layout(item, load_checkpoint_file(fetch(item.name))), item.name


def _other_size(item: WeightsEntry, model: str) -> str:
    same = [e.name for e in REGISTRY if e.kind == item.kind and model in e.models]
    hint = f"; for {model}: {', '.join(same)}" if same else ""
    return f"{item.name} holds weights for model={'/'.join(item.models)}, not model={model}{hint}"


def backbone_file(value: str, model: str) -> Path:
    """The backbone weights file for ``model.net.backbone_weights``: ``imagenet`` (the ImageNet
    backbone of ``model``'s size), a registry name (an ImageNet backbone, or a detector of the
    reference layout whose backbone is taken), or a local path."""
    if value == "imagenet":
        for item in REGISTRY:
            if item.kind == "imagenet" and model in item.models:
                return fetch(item.name)
        raise WeightsError(f"backbone_weights=imagenet: no ImageNet backbone for model={model}")
    if not is_name(value):
        return Path(value)
    item = entry(value)
    if model not in item.models:
        raise WeightsError(_other_size(item, model))
    if item.layout == "hf":
        raise WeightsError(
            f"{item.name} is in Hugging Face's layout: give it as model.init_from={item.name}"
        )
    return fetch(item.name)


# COCO's 80 categories in the order of the released detectors' labels 0..79.
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# Their COCO category ids (1..90 with gaps).
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip


def record_for(item: WeightsEntry) -> ModelRecord:
    """What a released detector file would record about itself: its size and settings (discrete
    sampling, the ablation's points), COCO's 80 classes, a 640x640 input."""
    from rtdetr_lit.record import ModelRecord

    if item.kind == "imagenet":
        raise WeightsError(f"{item.name} is an ImageNet backbone, not a detector")
    net: dict[str, Any] = {}
    if item.kind == "coco-discrete":
        net["sampling_method"] = "discrete"
    if item.kind == "coco-points":
        points = int(item.name[-1])
        net["num_points"] = [points] * 3
    return ModelRecord(
        model=item.models[0],
        num_classes=len(COCO_CLASS_NAMES),
        class_names=COCO_CLASS_NAMES,
        category_ids=COCO_CATEGORY_IDS,
        image_size=(640, 640),
        net=net,
    )


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
    """``python -m rtdetr_lit.weights list | download NAME... | import NAME FILE | path NAME``."""
    parser = argparse.ArgumentParser(
        prog="python -m rtdetr_lit.weights", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the table of names, with what is cached")
    download = commands.add_parser("download", help="fetch NAME(s) into the cache (once)")
    download.add_argument("names", nargs="+", metavar="NAME")
    bring = commands.add_parser(
        "import", help="check FILE, a copy of NAME's release file, and put it into the cache"
    )
    bring.add_argument("name")
    bring.add_argument("file")
    path = commands.add_parser("path", help="where NAME's file lives in the cache")
    path.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "list":
            print(_table())
            print(f"\ncache: {cache_dir()}")
        elif args.command == "download":
            for name in args.names:
                print(fetch(name))
        elif args.command == "import":
            print(import_file(args.name, args.file))
        else:
            print(cached_path(args.name))
    except WeightsError as err:
        parser.exit(2, f"{err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
