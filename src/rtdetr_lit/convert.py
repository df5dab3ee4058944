"""Convert RT-DETRv2 checkpoints (reference or Hugging Face) into rtdetr_lit state dicts, and
training checkpoints into the shareable ``model.safetensors``.

Command line (``--help`` for details)::

    python -m rtdetr_lit.convert --from reference --model r18 rtdetrv2_r18vd.pth r18.pth
    python -m rtdetr_lit.convert --from hf --model r50 model.safetensors r50.pth --num-classes 20
    python -m rtdetr_lit.convert --from lightning best.ckpt model.safetensors

``--from lightning`` writes :func:`write_weights_file`'s file; the others write:

Output file (``torch.save``; loads with ``torch.load(weights_only=True)``)::

    {"model": {our key: Tensor},
     "meta": {"source": "reference" | "hf", "name": "r18", "num_classes": 80,
              "skipped": [keys whose tensors came from the freshly built model],
              "filled": [...]}}

:func:`convert_reference_state_dict` reads this file back (any dict with a
``"model"`` key), so a converted file can be converted again, e.g. to another class count.

Hugging Face (``RTDetrV2ForObjectDetection``) keys versus ours (= the reference keys), as explicit
rules in ``_RULE_SPECS`` (``{i}`` an index, ``{p}`` a parameter name, ``{*}`` any tail):

- backbone ``model.backbone.model.``: stem ``embedder.embedder.{0,1,2}`` = ``conv1.conv1_{1,2,3}``;
  ``encoder.stages.S.layers.B`` = ``res_layers.S.blocks.B``; ``layer.{0,1,2}`` =
  ``branch2{a,b,c}``; ``shortcut`` = ``short`` and ``shortcut.1`` (after the average pool) =
  ``short.conv``; inside those ``convolution``/``normalization`` = ``conv``/``norm``.
- ``model.encoder_input_proj.L.{0,1}`` / ``model.decoder_input_proj.L.{0,1}`` =
  ``{encoder,decoder}.input_proj.L.{conv,norm}``; ``model.enc_output.{0,1}`` =
  ``decoder.enc_output.{proj,norm}``; ``model.{enc_score_head,enc_bbox_head,denoising_class_embed}``
  = ``decoder.*``; ``model.decoder.{class_embed,bbox_embed}`` = ``decoder.dec_{score,bbox}_head``;
  the CCFF modules (``lateral_convs``, ``fpn_blocks``, ``downsample_convs``, ``pan_blocks``) keep
  their names under ``model.encoder.``.
- transformer layers (AIFI ``model.encoder.aifi.I.layers.J`` = ``encoder.encoder.I.layers.J``,
  decoder ``model.decoder.layers.I`` = ``decoder.decoder.layers.I``): separate ``q_proj``,
  ``k_proj``, ``v_proj`` are stacked in q, k, v order into ``in_proj_weight``/``in_proj_bias``;
  ``o_proj`` = ``out_proj``; ``mlp.fc{1,2}`` = ``linear{1,2}``; ``self_attn_layer_norm`` =
  ``norm1``; ``final_layer_norm`` = ``norm2`` (AIFI) or ``norm3`` (decoder); ``encoder_attn`` =
  ``cross_attn`` with ``encoder_attn_layer_norm`` = ``norm2`` and buffer ``n_points_scale`` =
  ``num_points_scale``.
  HF's sampling-offset layout (heads, levels, points, 2) flattens exactly like ours (heads, P, 2)
  because HF only supports the same point count on every level.
- HF files written by ``save_pretrained`` (and transformers 4.x checkpoints) use older spellings:
  ``model.encoder.encoder.I`` for ``aifi.I``, ``fc1``/``fc2`` without ``mlp.``, ``out_proj`` for
  ``o_proj``. Both spellings are accepted.
- HF's top-level ``class_embed.*``/``bbox_embed.*`` are tied aliases of ``model.decoder.*`` (only
  the latter are used by HF's forward); they are dropped after checking they are equal, and
  written back by :func:`to_hf_state_dict`.
- HF does not store ``decoder.anchors``/``decoder.valid_mask`` (it recomputes them per input);
  they are filled from the target model, whose buffers match its own eval size.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rtdetr_lit.checkpoints import (
    EVAL_SIZE_BUFFERS,
    ConversionResult,
    align_to_target,
    extract_state_dict,
    infer_num_classes,
    load_checkpoint_file,
    model_state_dict,
    save_weights_file,
)
from rtdetr_lit.models.zoo import MODEL_NAMES
from rtdetr_lit.record import RECORD_KEY

__all__ = [
    "build_target_state_dict",
    "check_model_name",
    "convert_hf_state_dict",
    "convert_reference_state_dict",
    "main",
    "to_hf_state_dict",
    "write_weights_file",
]

logger = logging.getLogger(__name__)

_SLOTS = {"{i}": r"(\d+)", "{p}": r"(\w+)", "{*}": r"(.+)"}

_BB = "model.backbone.model."
_RES, _HF_RES = "backbone.res_layers.{i}.blocks.{i}", _BB + "encoder.stages.{i}.layers.{i}"
# (ours, HF) paths of the backbone's conv + BN pairs.
_BACKBONE_CONV_NORM = [
    *((f"backbone.conv1.conv1_{n + 1}", f"{_BB}embedder.embedder.{n}") for n in range(3)),
    (_RES + ".short.conv", _HF_RES + ".shortcut.1"),  # strided "d" shortcut: index 0 is the pool
    (_RES + ".short", _HF_RES + ".shortcut"),
    *((f"{_RES}.branch2{b}", f"{_HF_RES}.layer.{n}") for n, b in enumerate("abc")),
]
_AIFI, _HF_AIFI = "encoder.encoder.{i}.layers.{i}.", "model.encoder.aifi.{i}.layers.{i}."
_AIFI_LAYER = [
    ("self_attn.out_proj.{p}", "self_attn.o_proj.{p}"),
    ("norm1.{p}", "self_attn_layer_norm.{p}"),
    ("linear1.{p}", "mlp.fc1.{p}"),
    ("linear2.{p}", "mlp.fc2.{p}"),
    ("norm2.{p}", "final_layer_norm.{p}"),
]
_DEC, _HF_DEC = "decoder.decoder.layers.{i}.", "model.decoder.layers.{i}."
_DECODER_LAYER = [
    ("self_attn.out_proj.{p}", "self_attn.o_proj.{p}"),
    ("norm1.{p}", "self_attn_layer_norm.{p}"),
    ("cross_attn.num_points_scale", "encoder_attn.n_points_scale"),
    *(
        (f"cross_attn.{m}.{{p}}", f"encoder_attn.{m}.{{p}}")
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    ),
    ("norm2.{p}", "encoder_attn_layer_norm.{p}"),
    ("linear1.{p}", "mlp.fc1.{p}"),
    ("linear2.{p}", "mlp.fc2.{p}"),
    ("norm3.{p}", "final_layer_norm.{p}"),
]
_RULE_SPECS: list[tuple[str, str]] = [
    *((o + ".conv.{p}", h + ".convolution.{p}") for o, h in _BACKBONE_CONV_NORM),
    *((o + ".norm.{p}", h + ".normalization.{p}") for o, h in _BACKBONE_CONV_NORM),
    ("encoder.input_proj.{i}.conv.{p}", "model.encoder_input_proj.{i}.0.{p}"),
    ("encoder.input_proj.{i}.norm.{p}", "model.encoder_input_proj.{i}.1.{p}"),
    *((_AIFI + o, _HF_AIFI + h) for o, h in _AIFI_LAYER),
    *(
        (f"encoder.{m}.{{*}}", f"model.encoder.{m}.{{*}}")
        for m in ("lateral_convs", "fpn_blocks", "downsample_convs", "pan_blocks")
    ),
    ("decoder.input_proj.{i}.conv.{p}", "model.decoder_input_proj.{i}.0.{p}"),
    ("decoder.input_proj.{i}.norm.{p}", "model.decoder_input_proj.{i}.1.{p}"),
    *((_DEC + o, _HF_DEC + h) for o, h in _DECODER_LAYER),
    ("decoder.query_pos_head.{*}", "model.decoder.query_pos_head.{*}"),
    ("decoder.denoising_class_embed.{p}", "model.denoising_class_embed.{p}"),
    ("decoder.enc_output.proj.{p}", "model.enc_output.0.{p}"),
    ("decoder.enc_output.norm.{p}", "model.enc_output.1.{p}"),
    ("decoder.enc_score_head.{p}", "model.enc_score_head.{p}"),
    ("decoder.enc_bbox_head.{*}", "model.enc_bbox_head.{*}"),
    ("decoder.dec_score_head.{*}", "model.decoder.class_embed.{*}"),
    ("decoder.dec_bbox_head.{*}", "model.decoder.bbox_embed.{*}"),
]
# Attention modules whose q/k/v projections HF keeps separate and we keep packed.
_PACKED_SPECS = [
    (_AIFI + "self_attn", _HF_AIFI + "self_attn"),
    (_DEC + "self_attn", _HF_DEC + "self_attn"),
]
# Older HF spellings -> current ones (see the module docstring).
_HF_LEGACY = [
    (re.compile(r"^model\.encoder\.encoder\.(\d+)\.layers\."), r"model.encoder.aifi.\1.layers."),
    (re.compile(r"\.self_attn\.out_proj\."), ".self_attn.o_proj."),
    (re.compile(r"\.layers\.(\d+)\.fc([12])\."), r".layers.\1.mlp.fc\2."),
]
_HF_ALIASES = ("class_embed.", "bbox_embed.")  # top-level ties of model.decoder.<same>


def _compile(spec: str) -> tuple[str, str]:
    """Regex source and ``re`` expansion template for a rule spec with ``{i}``/``{p}``/``{*}``."""
    regex, template, n = [], [], 0
    for part in re.split(r"(\{i\}|\{p\}|\{\*\})", spec):
        if part in _SLOTS:
            n += 1
            regex.append(_SLOTS[part])
            template.append(f"\\g<{n}>")
        else:
            regex.append(re.escape(part))
            template.append(part)
    return "".join(regex), "".join(template)


class _Rule(NamedTuple):
    ours: re.Pattern[str]
    ours_template: str
    hf: re.Pattern[str]
    hf_template: str


def _compile_pairs(specs: list[tuple[str, str]], ours_tail: str, hf_tail: str) -> list[_Rule]:
    rules = []
    for ours, hf in specs:
        (ours_rx, ours_tpl), (hf_rx, hf_tpl) = _compile(ours), _compile(hf)
        rules.append(
            _Rule(re.compile(ours_rx + ours_tail), ours_tpl, re.compile(hf_rx + hf_tail), hf_tpl)
        )
    return rules


_RULES = _compile_pairs(_RULE_SPECS, "", "")
_PACKED = _compile_pairs(
    _PACKED_SPECS,
    r"\.in_proj_(?P<kind>weight|bias)",
    r"\.(?P<qkv>[qkv])_proj\.(?P<kind>weight|bias)",
)


def _match(rules: list[_Rule], key: str, to_hf: bool) -> tuple[re.Match[str], str] | None:
    """First rule matching ``key`` on its own side: the match and the other side's template."""
    for rule in rules:
        match = (rule.ours if to_hf else rule.hf).fullmatch(key)
        if match:
            return match, rule.hf_template if to_hf else rule.ours_template
    return None


def _too_many(keys: list[str]) -> str:
    return f"({len(keys)}): {', '.join(keys[:12])}" + (", ..." if len(keys) > 12 else "")


def _canonical_hf(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Current HF spellings, tied aliases resolved; returns (state, dropped alias keys)."""
    state: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"entry {key!r} is a {type(value).__name__}: expected a flat HF state dict "
                "(model.safetensors, pytorch_model.bin); for a reference checkpoint use --from "
                "reference"
            )
        for pattern, replacement in _HF_LEGACY:
            key = pattern.sub(replacement, key)
        if key in state:
            raise ValueError(f"HF state dict holds {key!r} twice (old and new spelling)")
        state[key] = value
    dropped = [k for k in state if k.startswith(_HF_ALIASES)]
    for alias in dropped:
        value, canonical = state.pop(alias), "model.decoder." + alias
        if canonical not in state:  # a file that kept only the alias of a tied pair
            state[canonical] = value
        elif not torch.equal(state[canonical], value):
            logger.warning(
                "HF %s differs from %s; using the latter, which HF's forward uses", alias, canonical
            )
    return state, dropped


def build_target_state_dict(name: str, num_classes: int | None = None) -> dict[str, Tensor]:
    """State dict of a freshly built ``rtdetr_lit.create_model(name, num_classes=...)``."""
    check_model_name(name)
    from rtdetr_lit.models.zoo import create_model

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return create_model(name, **kwargs).state_dict()


def convert_reference_state_dict(
    obj: Any, name: str, target: Mapping[str, Tensor] | None = None
) -> ConversionResult:
    """Convert a reference RT-DETRv2 checkpoint (or one of ours) into a state dict for ``name``.

    Args:
        obj: a loaded checkpoint: a full reference training checkpoint (``model``, ``ema``,
            ``optimizer``, ...), a released ``{"ema": {"module": sd}}`` file, our converted
            ``{"model": sd, "meta": ...}`` file, or a bare state dict
            (:func:`~rtdetr_lit.checkpoints.extract_state_dict`).
        name: zoo size, one of :data:`rtdetr_lit.models.zoo.MODEL_NAMES`.
        target: the target model's ``state_dict()``. When omitted, ``create_model(name)`` is built
            with the checkpoint's own number of classes and used as the target.

    Returns:
        A :class:`~rtdetr_lit.checkpoints.ConversionResult`; keys equal the reference keys
        (docs/rtdetrv2.md §10).
    """
    check_model_name(name)
    state = extract_state_dict(obj)
    if target is None:
        target = build_target_state_dict(name, infer_num_classes(state))
    return align_to_target(state, target, source=f"reference checkpoint for {name}")


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a zoo size (:data:`MODEL_NAMES`)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; choose one of {list(MODEL_NAMES)}")


def convert_hf_state_dict(
    state_dict: Mapping[str, Tensor], name: str, target: Mapping[str, Tensor] | None = None
) -> ConversionResult:
    """Convert ``RTDetrV2ForObjectDetection`` weights (HF keys) into our state dict for ``name``.

    Args:
        state_dict: HF ``model.state_dict()`` or a ``save_pretrained`` file's contents (either
            spelling; tied duplicate heads optional).
        name: zoo size, one of :data:`rtdetr_lit.models.zoo.MODEL_NAMES`.
        target: the target model's ``state_dict()``; it supplies ``decoder.anchors`` and
            ``decoder.valid_mask``. When omitted, ``create_model(name)`` is built with the
            checkpoint's number of classes.

    Returns:
        A :class:`~rtdetr_lit.checkpoints.ConversionResult` (``dropped`` lists the HF aliases).

    Raises:
        ValueError: HF keys without a counterpart, incomplete q/k/v triples, or a layout that does
            not fit the target (see :func:`~rtdetr_lit.checkpoints.align_to_target`).
    """
    check_model_name(name)
    hf, dropped = _canonical_hf(state_dict)
    ours: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in hf.items():
        if packed := _match(_PACKED, key, to_hf=False):
            match, template = packed
            packed_key = f"{match.expand(template)}.in_proj_{match['kind']}"
            qkv_parts.setdefault(packed_key, {})[match["qkv"]] = value
        elif renamed := _match(_RULES, key, to_hf=False):
            ours[renamed[0].expand(renamed[1])] = value
        else:
            unknown.append(key)
    if unknown:
        hint = (
            " (a reference checkpoint? use --from reference)"
            if unknown[0].startswith("backbone.")
            else ""
        )
        raise ValueError(f"HF keys with no rtdetr_lit counterpart{hint} {_too_many(unknown)}")
    for key, parts in qkv_parts.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{key}: HF checkpoint has only the {sorted(parts)} projections")
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if target is None:
        target = build_target_state_dict(name, infer_num_classes(ours))
    result = align_to_target(ours, target, source=f"HF checkpoint for {name}")
    result.dropped += dropped
    return result


def to_hf_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> ``RTDetrV2ForObjectDetection.state_dict()`` keys (current spelling).

    The result loads with ``hf_model.load_state_dict(sd, strict=True)``: packed attention
    projections are split into q/k/v, the tied top-level ``class_embed``/``bbox_embed`` aliases are
    added (same tensors), and the eval-size buffers, which HF recomputes, are left out.

    Raises:
        ValueError: keys that have no HF counterpart.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in EVAL_SIZE_BUFFERS:
            continue
        if packed := _match(_PACKED, key, to_hf=True):
            match, template = packed
            path = match.expand(template)
            for letter, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{path}.{letter}_proj.{match['kind']}"] = part.clone()
        elif renamed := _match(_RULES, key, to_hf=True):
            out[renamed[0].expand(renamed[1])] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys with no HF counterpart {_too_many(unknown)}")
    for key in [k for k in out if k.startswith(tuple("model.decoder." + a for a in _HF_ALIASES))]:
        out[key[len("model.decoder.") :]] = out[key]
    return out


def write_weights_file(
    checkpoint_path: str | os.PathLike[str], output: str | os.PathLike[str]
) -> Path:
    """Write the shareable weights of a training checkpoint: its detector weights (the EMA ones
    when the EMA callback ran) as ``.safetensors``, with the checkpoint's record
    (:mod:`rtdetr_lit.record`) in the metadata so that the file loads alone."""
    from rtdetr_lit.inference import read_checkpoint

    if Path(output).suffix != ".safetensors":
        raise ValueError(f"{output}: the weights file must end in .safetensors")
    checkpoint = read_checkpoint(checkpoint_path)
    if checkpoint.record is None:
        raise ValueError(
            f"{checkpoint_path} holds no rtdetr_lit record (not a training checkpoint of this "
            "package, or written before records existed): nothing describes its detector"
        )
    metadata = {RECORD_KEY: checkpoint.record.to_json(), "format": "pt"}
    return save_weights_file(output, model_state_dict(checkpoint.contents), metadata)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rtdetr_lit.convert",
        description=(
            "Convert an RT-DETRv2 checkpoint into an rtdetr_lit state dict. The target model is "
            "built with rtdetr_lit.create_model and the converted weights are loaded into it with "
            "strict=True before anything is written. Checkpoints are read without running code "
            "(torch.load weights_only=True, or safetensors)."
        ),
        epilog=(
            'OUT is written with torch.save as {"model": state_dict, "meta": {"source", "name", '
            '"num_classes", "skipped", "filled"}}. Example: python -m rtdetr_lit.convert --from '
            "reference --model r18 rtdetrv2_r18vd_120e_coco.pth r18_coco.pth"
        ),
    )
    parser.add_argument(
        "--from",
        dest="source",
        choices=("reference", "hf", "lightning"),
        required=True,
        help="reference: a lyuwenyu/RT-DETR rtdetrv2 checkpoint (ema.module, else model, else a "
        "bare state dict; also our own converted files). hf: RTDetrV2ForObjectDetection weights "
        "(model.safetensors or pytorch_model.bin). lightning: a training checkpoint of this "
        "package, written as the shareable OUT.safetensors (EMA weights and the detector's "
        "record; --model and --num-classes do not apply)",
    )
    parser.add_argument(
        "--model", choices=MODEL_NAMES, help="zoo size of the checkpoint (reference and hf)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the target model (default: the checkpoint's). When it differs, the "
        "class-dependent tensors (score heads, denoising embedding) keep the fresh model's "
        "initialisation, for fine-tuning on another dataset",
    )
    parser.add_argument("input", type=Path, metavar="IN", help=".pth/.pt/.ckpt/.bin/.safetensors")
    parser.add_argument("output", type=Path, metavar="OUT", help="converted file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m rtdetr_lit.convert --help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.source == "lightning":
        try:
            path = write_weights_file(args.input, args.output)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}") from err
        logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)
        return 0
    if args.model is None:
        parser.error(f"--model is required with --from {args.source}")
    from rtdetr_lit import create_model

    try:
        checkpoint = load_checkpoint_file(args.input)
        source_sd = extract_state_dict(checkpoint) if args.source == "reference" else checkpoint
        num_classes = args.num_classes or infer_num_classes(source_sd)
        model = create_model(args.model, **({"num_classes": num_classes} if num_classes else {}))
        convert = (
            convert_reference_state_dict if args.source == "reference" else convert_hf_state_dict
        )
        result = convert(checkpoint, args.model, target=model.state_dict())
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    model.load_state_dict(result.state_dict, strict=True)
    meta = {
        "source": args.source,
        "name": args.model,
        "num_classes": infer_num_classes(result.state_dict),
        "skipped": result.skipped,
        "filled": result.filled,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": result.state_dict, "meta": meta}, args.output)
    logger.info(
        "wrote %d tensors to %s (%s %s, %s classes; skipped %d, filled %d)",
        len(result.state_dict),
        args.output,
        args.source,
        args.model,
        meta["num_classes"],
        len(result.skipped),
        len(result.filled),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
