"""Benchmark compute_embeddings.py against the floor of running its model.

Generates webdataset shards of synthetic images and a small DINOv2 (ViT-S/14's shape, random weights,
224-pixel crops), saved to a folder (reused when already there), then measures in one run:
  - the floor: the same model on the same images, decoded and processed beforehand (not timed), batch by
    batch in one process: images per second;
  - decoding: opening and processing images alone, in one process: images per second per decode worker;
  - compute_embeddings.py as a whole process (Python, imports, decode workers): images per second, its
    ratio to the floor, peak RSS;
  - with --device cuda, where torch sees a GPU: the floor and the script again on it (images/s); on a
    machine without one it says so and skips.

    python benchmarks/bench_embed.py --images 1000 --workers 2
"""

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "examples")]

from bench_pipeline import cuda_device, machine, mark_generated, measure, needs_generating, warm_cache  # noqa: E402

FLOOR = """
import glob, io, json, sys, tarfile, time, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
folder, model_dir, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
model = AutoModel.from_pretrained(model_dir).eval().to(device)
images = []
for shard in sorted(glob.glob(folder + "/*.tar")):
    with tarfile.open(shard) as tar:
        images += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".jpg", ".png", ".webp"))]
start = time.perf_counter()
pixels = [processor(images=Image.open(io.BytesIO(b)).convert("RGB"), return_tensors="pt")["pixel_values"][0]
          for b in images]
decode = time.perf_counter() - start
start = time.perf_counter()
with torch.inference_mode():
    for first in range(0, len(pixels), batch):
        out = model(pixel_values=torch.stack(pixels[first:first + batch]).to(device)).pooler_output
        (out / out.norm(dim=1, keepdim=True)).half().cpu()
model_s = time.perf_counter() - start
print(json.dumps({"images": len(images), "decode_s": decode, "model_s": model_s, "threads": torch.get_num_threads()}))
"""


def generate(folder: str, images: int, seed: int) -> None:
    import make_toy_images

    spec = {"images": images, "seed": seed, "sizes": [200, 500], "model": "vit-s14-224"}
    if not needs_generating(folder, spec):
        return
    make_toy_images.make_shards(os.path.join(folder, "shards"), images, 100, seed, sizes=(200, 500))
    make_toy_images.save_tiny_dinov2(os.path.join(folder, "model"), seed, image_size=224, hidden=384, layers=12,
                                     heads=6)
    mark_generated(folder, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decode workers (default: all cores)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"),
                        help="folder for the generated data (reused when it matches)")
    args = parser.parse_args()

    print(machine())
    data = os.path.join(args.data, f"embed_{args.images}")
    generate(data, args.images, 0)
    warm_cache(data)
    shards = os.path.join(data, "shards")
    last = (args.images + 99) // 100 - 1
    print(f"data: {args.images} images of 200-500 px in {last + 1} shards; model: DINOv2 at ViT-S/14's shape "
          f"(random weights), 224 px crops; batch {args.batch_size}; --workers {args.workers}\n")
    floor, script = run_both(shards, data, last, args, "cpu")
    n = floor["images"]
    floor_rate, script_rate = n / floor["model_s"], n / script["wall_s"]
    print(f"{'step':58s} {'images/s':>9s} {'peak RSS MB':>12s}")
    print(f"{'floor: the model on pre-processed tensors (torch, ' + str(floor['threads']) + ' threads)':58s} "
          f"{floor_rate:9.1f}")
    print(f"{'decoding and processing, one process (per decode worker)':58s} {n / floor['decode_s']:9.1f}")
    print(f"{'compute_embeddings.py, whole process (imports included)':58s} {script_rate:9.1f} "
          f"{script['peak_rss_mb']:12.0f}")
    print(f"\ncompute_embeddings.py takes {floor_rate / script_rate:.2f}x the floor's time "
          f"({script['wall_s']:.1f} s against {floor['model_s']:.1f} s)")
    gpu = cuda_device()
    if gpu is None:
        print("--device cuda: torch sees no CUDA device on this machine; skipped")
        return
    floor, script = run_both(shards, data, last, args, "cuda")
    print(f"--device cuda ({gpu}): the floor {n / floor['model_s']:.1f} images/s, compute_embeddings.py "
          f"{n / script['wall_s']:.1f} images/s (whole process), {script['wall_s'] / floor['model_s']:.2f}x")


def run_both(shards: str, data: str, last: int, args: argparse.Namespace, device: str) -> tuple[dict, dict]:
    """The floor's figures and the script's measurement, on `device`."""
    floor = json.loads(measure([sys.executable, "-c", FLOOR, shards, os.path.join(data, "model"),
                                str(args.batch_size), device])["stdout"])
    out = tempfile.mkdtemp(prefix="dbp_bench_embed_")
    script = measure([sys.executable, os.path.join(ROOT, "compute_embeddings.py"), "--shards",
                      os.path.join(shards, f"{{00000..{last:05d}}}.tar"), "--output_folder", os.path.join(out, "emb"),
                      "--model", os.path.join(data, "model"), "--batch-size", str(args.batch_size),
                      "--workers", str(args.workers), "--device", device])
    return floor, script

if __name__ == "__main__":
    main()
