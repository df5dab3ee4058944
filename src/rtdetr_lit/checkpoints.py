"""Read weights files safely and fit their state dicts to a model: the ground floor, importing
nothing else of the package.

Our detector's state-dict keys are, by design, exactly the reference implementation's keys
(``backbone.*``, ``encoder.*``, ``decoder.*``; see docs/rtdetrv2.md §10), so loading a reference
checkpoint is selection plus validation:

1. :func:`load_checkpoint_file` reads ``.pth``/``.pt``/``.ckpt``/``.bin`` with
   ``torch.load(weights_only=True)`` and ``.safetensors`` with safetensors; neither can run code.
2. :func:`extract_state_dict` picks the weights out of a container: ``obj["ema"]["module"]`` if
   present, else ``obj["model"]`` (a reference training checkpoint, or our own converted file
   ``{"model": state_dict, "meta": {...}}``), else ``obj`` itself (a bare state dict). A leading
   ``module.`` (DistributedDataParallel) is stripped.
3. :func:`align_to_target` checks names and shapes against the target model's state dict and
   tolerates the two legitimate differences: a different number of classes (score heads and the
   denoising embedding keep the target's tensors) and a different eval size (``decoder.anchors``
   and ``decoder.valid_mask`` keep the target's). Everything it did not take from the checkpoint
   is reported in the returned :class:`ConversionResult`.

:mod:`rtdetr_lit.convert` builds on these for whole reference files and renames Hugging Face
checkpoints before :func:`align_to_target`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

__all__ = [
    "EVAL_SIZE_BUFFERS",
    "ConversionResult",
    "UnsafeCheckpointError",
    "align_to_target",
    "atomic_write",
    "check_finite",
    "current_umask",
    "extract_state_dict",
    "infer_num_classes",
    "load_checkpoint_file",
    "load_model_weights",
    "load_weights_into",
    "model_state_dict",
    "read_safetensors_metadata",
    "save_weights_file",
]

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

# Tensors whose first dimension is the number of classes (+1 for the padding row of the embedding).
_CLASS_DEPENDENT = re.compile(
    r"decoder\.(enc_score_head|dec_score_head\.\d+)\.(weight|bias)|decoder\.denoising_class_embed\.weight"
)
# Buffers precomputed for one eval size (docs/rtdetrv2.md §4); a model built for another size, or
# for none, legitimately differs here.
_ANCHORS = "decoder.anchors"
EVAL_SIZE_BUFFERS = frozenset({_ANCHORS, "decoder.valid_mask"})

_MAX_LISTED = 12


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint holds objects other than tensors and plain containers: refused."""


@dataclass
class ConversionResult:
    """Outcome of a conversion.

    Attributes:
        state_dict: our keys -> tensors: exactly the target's keys, shapes and dtypes, so
            ``model.load_state_dict(result.state_dict, strict=True)`` succeeds.
        skipped: class-dependent keys whose shape differs from the target (another number of
            classes); the target's tensor was kept, untrained for this checkpoint.
        filled: eval-size buffers (anchors, valid mask) taken from the target: the checkpoint
            lacks them (HF does not store them) or has them for another input size. They are a
            function of the model's ``eval_spatial_size``, so nothing learned is lost.
        dropped: checkpoint entries deliberately not used (eval-size buffers the target has no slot
            for, HF's tied duplicate heads).
    """

    state_dict: dict[str, Tensor]
    skipped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint file onto the CPU without executing any code stored in it.

    ``.safetensors`` files return a flat ``dict[str, Tensor]``; ``.pth``/``.pt``/``.ckpt``/``.bin``
    files return whatever tensors and plain containers were pickled (``torch.load`` with
    ``weights_only=True``: pickled classes or functions are refused, never called).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: a pickle holding objects other than tensors and plain containers.
        ValueError: unknown suffix or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"could not read safetensors file {path}: {err}") from err
    if suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"unsupported checkpoint suffix {suffix!r} for {path}; "
            f"expected one of {[*_TORCH_SUFFIXES, '.safetensors']}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        # from None: torch's own text suggests weights_only=False, the one thing not to do.
        raise UnsafeCheckpointError(
            f"{path}: refused to load it. The file holds Python objects other than tensors and "
            "plain containers"
            + (f" (the first one: {found.group(1)})" if found else "")
            + "; unpickling them could run code, and rtdetr_lit never does. If the file comes "
            "from a source you trust, re-save only its weights there (torch.save of a state "
            "dict, or a .safetensors file), or convert it with python -m rtdetr_lit.convert "
            "in that trusted environment."
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"could not read checkpoint {path}: {err}") from err


def _not_finite(key: str, value: Tensor) -> bool:
    # The eval-size anchors are +inf where an anchor lies outside the image (the reference's rule:
    # every reference checkpoint and every model built for 640 px has some), so there only NaN
    # and -inf are broken. The key may carry a prefix (``net.`` in a Lightning checkpoint).
    if key == _ANCHORS or key.endswith("." + _ANCHORS):
        return bool(torch.isnan(value).any() or torch.isneginf(value).any())
    return not bool(torch.isfinite(value).all())


def check_finite(state_dict: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming every floating tensor of ``state_dict`` with a NaN or inf
    (``decoder.anchors``: NaN or -inf; +inf marks its anchors outside the image).

    Called before any weight is copied, so a broken file leaves the model untouched.
    """
    broken = [
        key
        for key, value in state_dict.items()
        if isinstance(value, Tensor) and value.is_floating_point() and _not_finite(key, value)
    ]
    if broken:
        raise ValueError(
            f"{source}: NaN or inf values in {len(broken)} of its tensors: {_listed(broken)}. "
            "Nothing was loaded: the weights are broken (a diverged run?); use an earlier "
            "checkpoint."
        )


def extract_state_dict(obj: Any) -> dict[str, Tensor]:
    """Select the weights from a checkpoint container (see the module docstring for the order).

    Returns a new flat ``dict[str, Tensor]`` with any common ``module.`` prefix removed.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(obj).__name__}")
    ema = obj.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
        state = ema["module"]
    elif isinstance(obj.get("model"), Mapping):
        state = obj["model"]
    else:
        state = obj
    non_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise ValueError(
            "no state dict found: expected obj['ema']['module'], obj['model'] or a bare "
            f"dict of tensors; entries that are not tensors: {_listed(non_tensors)}"
        )
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def infer_num_classes(state_dict: Mapping[str, Tensor]) -> int | None:
    """Number of classes from the encoder score head (ours or HF naming), ``None`` if absent."""
    for key in ("decoder.enc_score_head.weight", "model.enc_score_head.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def align_to_target(
    state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor], source: str = "checkpoint"
) -> ConversionResult:
    """Validate ``state_dict`` (our key names) against ``target`` and build the loadable result.

    Args:
        state_dict: converted checkpoint, our keys.
        target: the target model's ``state_dict()`` (real tensors: some may be copied over).
        source: word used in error messages (e.g. "reference checkpoint").

    Returns:
        A :class:`ConversionResult` whose ``state_dict`` has exactly the target's keys, shapes and
        dtypes (values cast to the target's dtype).

    Raises:
        ValueError: missing keys, unexpected keys, or a shape mismatch that the class count or
            eval size does not explain; the message names every offending key.
    """
    check_finite(state_dict, source)
    result = ConversionResult(state_dict={})
    missing, mismatched = [], []
    for key, want in target.items():
        have = state_dict.get(key)
        if have is None:
            if key in EVAL_SIZE_BUFFERS:
                result.state_dict[key] = want.detach().clone()
                result.filled.append(key)
            else:
                missing.append(key)
        elif have.shape == want.shape:
            result.state_dict[key] = have.to(want.dtype)
        elif key in EVAL_SIZE_BUFFERS:
            result.state_dict[key] = want.detach().clone()
            result.filled.append(key)
        elif _CLASS_DEPENDENT.fullmatch(key):
            result.state_dict[key] = want.detach().clone()
            result.skipped.append(key)
        else:
            mismatched.append(f"{key} {tuple(have.shape)} vs {tuple(want.shape)}")
    extra = [k for k in state_dict if k not in target]
    unexpected = [k for k in extra if k not in EVAL_SIZE_BUFFERS]
    result.dropped = [k for k in extra if k in EVAL_SIZE_BUFFERS]
    if missing or unexpected or mismatched:
        problems = [
            f"{title} ({len(keys)}): {_listed(keys)}"
            for title, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches, checkpoint vs model", mismatched),
            )
            if keys
        ]
        hint = ""
        if any(k.startswith("model.backbone.") for k in unexpected):
            hint = " (this looks like a Hugging Face checkpoint: convert it with --from hf)"
        raise ValueError(f"{source} does not fit the model{hint}: " + "; ".join(problems))
    if result.skipped:
        logger.warning(
            "kept the model's own tensors (the checkpoint has another number of classes) for: %s",
            ", ".join(result.skipped),
        )
    return result


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def load_model_weights(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Read ``path`` (:func:`load_checkpoint_file`) and :func:`load_weights_into` ``model``."""
    return load_weights_into(model, load_checkpoint_file(path), str(path))


def load_weights_into(model: nn.Module, obj: Any, source: str) -> list[str]:
    """Load the weights held by the loaded checkpoint ``obj`` (:func:`model_state_dict`) into
    ``model`` (strictly) and return the skipped keys; ``source`` names the file in messages.

    Class-dependent tensors of another shape (a different number of classes) keep the model's own
    values; their keys are returned and logged. Eval-size buffers always follow the model.
    """
    result = align_to_target(model_state_dict(obj), model.state_dict(), source=source)
    model.load_state_dict(result.state_dict, strict=True)
    return result.skipped


def model_state_dict(obj: Any) -> dict[str, Tensor]:
    """The detector's weights in a loaded checkpoint: a Lightning checkpoint of ``RTDETRModule``
    (its ``state_dict`` holds the EMA weights when the EMA callback ran; the ``net.`` prefix is
    stripped), a file written by ``python -m rtdetr_lit.convert`` or a safetensors weights file, a
    reference checkpoint (EMA preferred) or a bare state dict (:func:`extract_state_dict`)."""
    if isinstance(obj, Mapping) and "pytorch-lightning_version" in obj:
        prefix = "net."
        obj = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    return extract_state_dict(obj)


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"could not read safetensors file {path}: {err}") from err


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(f)`` so that ``path`` is either the old file or the whole new
    one: a temporary file beside it, flushed to disk, then renamed into place (atomic on POSIX).
    The file gets the permissions of a normally created file (``0666`` less the umask), not the
    owner-only ones of a temporary file, so teammates on a shared file system can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (it can only be read by setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_weights_file(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write ``state_dict`` as a ``.safetensors`` file with string ``metadata``, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    data = save(tensors, metadata=dict(metadata))
    return atomic_write(path, lambda f: f.write(data))
