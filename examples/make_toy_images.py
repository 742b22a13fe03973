"""Make webdataset shards of synthetic images, and a tiny randomly initialised DINOv2 to embed them with.

The shards are laid out as img2dataset writes them: per sample `<key>.jpg` (or .png, .webp), `<key>.txt`
(its caption) and `<key>.json` (its url, caption and key), keys `<shard><index>` (`000010007`). The
images are coloured shapes on coloured grounds, of varied sizes; a fraction of them are near-repeats of
others (re-encoded, slightly resized: what deduplication finds). The model is DINOv2's architecture at a
toy size, with random weights, saved with its image processor to a folder that transformers loads like a
downloaded model, with no network.

    python examples/make_toy_images.py --shards toy/shards --images 400 --per-shard 100 --model toy/dinov2
"""

import argparse
import io
import json
import os
import tarfile

import numpy as np

SHAPES = ("rectangle", "ellipse", "triangle")


def make_image(rng: np.random.Generator, sizes: tuple[int, int] = (48, 160)):
    """A few coloured shapes on a coloured ground, of sizes[0] to sizes[1] pixels a side."""
    from PIL import Image, ImageDraw

    width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        box, color = [int(x0), int(y0), int(x1) + 1, int(y1) + 1], tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        if shape == "rectangle":
            draw.rectangle(box, fill=color)
        elif shape == "ellipse":
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
    return image


def encoded(image, form: str, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[form], quality=quality)
    return out.getvalue()


def make_shards(folder: str, images: int, per_shard: int, seed: int = 0, duplicates: float = 0.2,
                sizes: tuple[int, int] = (48, 160)) -> list[str]:
    """Shards 00000.tar, ...; returns their paths. Samples are jpg, some png or webp; a fraction nearly repeat
    an earlier image; captions hold non-ASCII text."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    made, paths = [], []
    for start in range(0, images, per_shard):
        shard = start // per_shard
        paths.append(os.path.join(folder, f"{shard:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                if made and rng.random() < duplicates:  # a re-upload: the same picture, resized and re-encoded
                    source = made[int(rng.integers(0, len(made)))]
                    image = source.resize((max(8, source.width - 2), max(8, source.height - 1)))
                else:
                    image = make_image(rng, sizes)
                made.append(image)
                form = ("jpg", "jpg", "png", "webp")[i % 4]
                key = f"{shard:05d}{i:04d}"
                caption = f"shape n°{i} — {'красный' if i % 3 else 'bleu'} ✓"
                meta = {"url": f"https://example.com/images/{i}.{form}", "caption": caption, "key": key}
                for ext, payload in ((form, encoded(image, form)), ("txt", caption.encode()),
                                     ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


def save_tiny_dinov2(folder: str, seed: int = 0, image_size: int = 56, hidden: int = 32, layers: int = 2,
                     heads: int = 2) -> str:
    """DINOv2 at a toy size (by default hidden size 32, 2 layers), random weights, and its processor, saved to
    `folder`."""
    import torch
    import transformers
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=4 * hidden if hidden > 32 else 64, image_size=image_size, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    # DINOv2's own processor settings, at the toy size: resize the short side, centre crop, ImageNet's mean/std.
    BitImageProcessorPil(size={"shortest_edge": image_size + 8}, crop_size={"height": image_size, "width": image_size},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="folder for the shards")
    parser.add_argument("--images", type=int, default=400, help="images in all (default: 400)")
    parser.add_argument("--per-shard", type=int, default=100, help="images per shard (default: 100)")
    parser.add_argument("--duplicates", type=float, default=0.2, help="fraction of near-repeats (default: 0.2)")
    parser.add_argument("--model", help="also save a tiny random DINOv2 and its processor to this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = make_shards(args.shards, args.images, args.per_shard, args.seed, args.duplicates)
    print(f"{args.images} images in {len(paths)} shards -> {args.shards}")
    if args.model:
        save_tiny_dinov2(args.model, args.seed)
        print(f"a tiny random DINOv2 and its image processor -> {args.model}")


if __name__ == "__main__":
    main()
