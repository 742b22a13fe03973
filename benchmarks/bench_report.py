"""Benchmark make_report.py against one plain read of the same shards.

Generates (once; reused when already there) webdataset shards of synthetic images, random embeddings in
clip-retrieval's layout under the shards' keys (a fifth of them near-repeats of an earlier row), and the
pipeline's outputs: cluster_embeddings.py at k = 500, deduplicate.py (eps 0.01), d_intra, d_inter, prune.py.
Then measures in one run:
  - the floor: every sample of every shard read once with webdataset's own tar reader, in one process;
  - make_report.py (defaults: 200 cluster pages, 8 per strip, 100 pairs) as a whole process: its time, its ratio
    to the floor, peak RSS (the largest process, and the sum over its workers), and the report's size.

    python benchmarks/bench_report.py --images 100000 --workers 2
    python benchmarks/bench_report.py --more-shards 300   # and 300 shards holding no clustered sample

--more-shards N adds N shards (links to the others, under new names) that hold no sample of the clusters, given to
make_report.py and read by the floor: LAION's shape, where most of the 40,000 shards hold no sample a report shows.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "examples")]

from bench_pipeline import machine, mark_generated, measure, needs_generating, warm_cache  # noqa: E402

PER_SHARD = 1000
DIM = 64
K = 500
FLOOR = """
import glob, sys
from webdataset.tariterators import tarfile_samples
total = 0
for shard in sorted(glob.glob(sys.argv[1] + "/*.tar")):
    for sample in tarfile_samples([{"url": shard}]):
        total += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
print(total)
"""


def run(script: str, *args) -> None:
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{script} failed: {r.stderr.strip().splitlines()[-1]}")


def write_embeddings(folder: str, shards: list[str], seed: int) -> None:
    """One clip-retrieval part per shard: random unit rows under the shard's keys, a fifth near-repeats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img_emb"))
    os.makedirs(os.path.join(folder, "metadata"))
    earlier = rng.standard_normal((1, DIM))
    for n, shard in enumerate(shards):
        with tarfile.open(shard) as tar:
            keys = sorted({name.split(".", 1)[0] for name in tar.getnames()})
        x = rng.standard_normal((len(keys), DIM))
        repeats = rng.random(len(keys)) < 0.2
        x[repeats] = earlier[rng.integers(0, len(earlier), repeats.sum())] + 0.01 * rng.standard_normal((repeats.sum(),
                                                                                                         DIM))
        earlier = np.concatenate([earlier, x])[-50_000:]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(os.path.join(folder, "img_emb", f"img_emb_{n}.npy"), x.astype(np.float16))
        pq.write_table(pa.table({"image_path": keys}), os.path.join(folder, "metadata", f"metadata_{n}.parquet"))


def generate(folder: str, images: int, seed: int) -> None:
    import make_toy_images

    spec = {"images": images, "seed": seed, "per_shard": PER_SHARD, "dim": DIM, "k": K}
    if not needs_generating(folder, spec):
        return
    shards = make_toy_images.make_shards(os.path.join(folder, "shards"), images, PER_SHARD, seed, sizes=(128, 320))
    write_embeddings(os.path.join(folder, "emb"), shards, seed)
    run("cluster_embeddings.py", "--embeddings", os.path.join(folder, "emb", "img_emb"), "--num_clusters", K,
        "--save_folder", os.path.join(folder, "c1"))
    sorted_dir = os.path.join(folder, "c1", "sorted_clusters")
    run("deduplicate.py", "--sorted_clusters_path", sorted_dir, "--eps", 0.01, "--save_folder",
        os.path.join(folder, "dedup"))
    run("compute_avg_dist_to_cluster_centroid.py", "--sorted_clusters_path", sorted_dir,
        "--avg_distance_to_cent_save_path", os.path.join(folder, "dintra.npy"))
    run("compute_centroid_distances.py", "--sorted_clusters_path", sorted_dir,
        "--mean_centroid_distances_save_path", os.path.join(folder, "dinter.npy"))
    run("prune.py", "--sorted-clusters-path", sorted_dir, "--avg_distance_to_cent_save_path",
        os.path.join(folder, "dintra.npy"), "--mean_centroid_distances_save_path", os.path.join(folder, "dinter.npy"),
        "--prune-ratio", 0.3, "--save-dir", os.path.join(folder, "run"))
    mark_generated(folder, spec)


def folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(where, name)) for where, _, names in os.walk(folder)
               for name in names) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"))
    parser.add_argument("--more-shards", type=int, default=0, help="shards holding no clustered sample (see above)")
    args = parser.parse_args()
    folder = os.path.join(args.data, f"report_{args.images}")
    generate(folder, args.images, args.seed)
    warm_cache(folder)
    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(folder, "shards")
        clustered = sorted(os.listdir(shards))
        if args.more_shards:  # every shard as a link in one folder: the clustered ones, then the others
            linked = os.path.join(tmp, "shards")
            os.mkdir(linked)
            for n in range(len(clustered) + args.more_shards):
                os.symlink(os.path.join(shards, clustered[n % len(clustered)]), os.path.join(linked, f"{n:05d}.tar"))
            shards = linked
        count = len(os.listdir(shards))
        floor = measure([sys.executable, "-c", FLOOR, shards])
        out = os.path.join(tmp, "report")
        report = measure([sys.executable, os.path.join(ROOT, "make_report.py"), "--prune-dir",
                          os.path.join(folder, "run"), "--dedup-dir", os.path.join(folder, "dedup"), "--shards",
                          os.path.join(shards, f"{{00000..{count - 1:05d}}}.tar"), "--save_folder", out,
                          "--workers", str(args.workers)])
        size = folder_mb(out)
        pages = len(os.listdir(os.path.join(out, "clusters")))
    print(machine())
    print(f"{args.images} images in {len(clustered)} shards ({folder_mb(os.path.join(folder, 'shards')):.0f} MB)"
          f"{f' and {args.more_shards} more holding none of them' if args.more_shards else ''}, k = {K}, "
          f"{args.workers} workers")
    print(f"floor (every sample read once, webdataset's tar reader, 1 process): {floor['wall_s']:.2f} s")
    print(f"make_report.py: {report['wall_s']:.2f} s = {report['wall_s'] / floor['wall_s']:.2f}x the floor; "
          f"peak RSS {report['peak_rss_mb']:.0f} MB (largest process), {report['tree_rss_mb']:.0f} MB (all)")
    print(f"report: {size:.1f} MB, {pages} cluster pages; {report['stdout']}")
    print(json.dumps({"ratio": report["wall_s"] / floor["wall_s"], "peak_rss_mb": report["peak_rss_mb"],
                      "size_mb": size}))


if __name__ == "__main__":
    main()
