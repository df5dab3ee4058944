"""Draw what training sees: augmented samples before and after the augmentation stop epoch.

    python scripts/show_augmentations.py                       # data=synthetic, model=demo
    python scripts/show_augmentations.py --num 6 --out aug.png recipe.multiscale=true
    python scripts/show_augmentations.py --data coco model=r50 data.batch_size=4

Positional arguments are Hydra overrides of the ``train`` config. The samples come out of the real
training DataLoader of that config (its sampler set to the epoch, then iterated), so they are
exactly the batches training gets: the top row at ``--epoch-before`` (photometric distortion,
zoom-out, IoU crop, flip, and the multi-scale resize when the recipe has it), the bottom row at
``--epoch-after`` (default: the stop epoch; flip and resize only). Boxes and class names are drawn
with ``rtdetr_lit.visualize``. ``--scale`` resizes the picture and ``--colors`` saves it with a
palette (a smaller file); neither changes what is drawn.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_convert

from rtdetr_lit.config import compose_config
from rtdetr_lit.visualize import draw_boxes

_CAPTION_HEIGHT = 24
_GAP = 6


def take_samples(loader, epoch: int, num: int) -> tuple[list, list, list[tuple[int, int]]]:
    """The first ``num`` (image, target) pairs of ``epoch``, and the (h, w) of their batches."""
    loader.sampler.set_epoch(epoch)
    images, targets, sizes = [], [], []
    for batch_images, batch_targets in loader:
        sizes.append(tuple(batch_images.shape[-2:]))
        images.extend(batch_images[: num - len(images)])
        targets.extend(batch_targets[: num - len(targets)])
        if len(images) == num:
            break
    if len(images) < num:
        raise ValueError(f"the training loader gave {len(images)} images, fewer than --num {num}")
    return images, targets, sizes


def draw_sample(image, target, class_names, scale: float):
    """``image`` (3, H, W) float with its normalised cxcywh boxes drawn, resized by ``scale``."""
    if scale != 1.0:
        image = F.interpolate(
            image[None], scale_factor=scale, mode="bilinear", antialias=True, align_corners=False
        )[0]
    sh, sw = image.shape[-2:]
    boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([sw, sh, sw, sh])
    return draw_boxes(image, boxes, target["labels"], class_names)


def caption(epoch: int, stop: int, multiscale: bool, sizes: list[tuple[int, int]]) -> str:
    """What the row shows: the epoch, the operations in force and the batches' input sizes."""
    shown = ", ".join(f"{w}x{h}" for h, w in dict.fromkeys(sizes))
    if epoch < stop:
        ops = "photometric + zoom-out + IoU crop + flip" + (" + multi-scale" if multiscale else "")
        return f"epoch {epoch} (before stop epoch {stop}): {ops}; input {shown}"
    return f"epoch {epoch} (from stop epoch {stop} on): flip + resize only; input {shown}"


def contact_sheet(rows: list[list[torch.Tensor]], captions: list[str]) -> Image.Image:
    """Each row of (3, H, W) uint8 tiles under its caption, on white: sizes stay comparable."""
    width = max(sum(t.shape[-1] + _GAP for t in row) + _GAP for row in rows)
    height = sum(_CAPTION_HEIGHT + max(t.shape[-2] for t in row) + _GAP for row in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=15)
    y = 0
    for row, text in zip(rows, captions, strict=True):
        draw.text((_GAP, y + 4), text, fill="black", font=font)
        y += _CAPTION_HEIGHT
        x = _GAP
        for tile in row:
            sheet.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (x, y))
            x += tile.shape[-1] + _GAP
        y += max(t.shape[-2] for t in row) + _GAP
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    parser.add_argument("--data", default="synthetic", help="data config (default: %(default)s)")
    parser.add_argument("--epoch-before", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--epoch-after", type=int, default=None, help="(default: data.augment.stop_epoch)"
    )
    parser.add_argument("--num", type=int, default=6, help="images per row (default: 6)")
    parser.add_argument("--scale", type=float, default=1.0, help="picture scale (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--colors", type=int, default=0, help="save with a palette of this many colours (<= 256)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("augmentations.png"), help="(default: %(default)s)"
    )
    args = parser.parse_args()
    if args.num < 1 or args.scale <= 0 or not 0 <= args.colors <= 256:
        parser.error("--num must be >= 1, --scale > 0 and --colors in 0..256")

    # Images without objects are expected (negatives); torchvision warns about each.
    warnings.filterwarnings("ignore", message="boxes doesn't contain any box")
    cfg = compose_config("train", [f"data={args.data}", *args.overrides])
    L.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    loader = datamodule.train_dataloader()
    stop = datamodule.augment.stop_epoch
    collate = datamodule.collate_train
    epochs = [args.epoch_before, stop if args.epoch_after is None else args.epoch_after]

    rows, captions = [], []
    for epoch in epochs:
        images, targets, sizes = take_samples(loader, epoch, args.num)
        rows.append(
            [
                draw_sample(im, t, datamodule.class_names, args.scale)
                for im, t in zip(images, targets, strict=True)
            ]
        )
        multiscale = bool(collate.sizes) and epoch < collate.stop_epoch
        captions.append(caption(epoch, stop, multiscale, sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet = contact_sheet(rows, captions)
    if args.colors:  # a few times smaller a file, for documentation
        sheet = sheet.quantize(colors=args.colors)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
