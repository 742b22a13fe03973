"""Benchmark cluster_embeddings.py against the floor of the faiss work it cannot avoid.

Generates float16 embeddings (unit vectors around concepts, as image embeddings are) and their keys
(reused when already there), warms the page cache, then measures in one run:
  - the floor: one process that reads the embeddings, trains faiss.Kmeans on the same sample with
    the same settings, and searches every row's nearest centroid. The same settings include faiss's own
    loop for every distance (dbpkit.kmeans.exact_faiss: the script's outputs are the same bytes for any
    thread count, and stay those of earlier releases), so the floor does the script's arithmetic;
  - the same floor with faiss's default, BLAS for batches of queries, for reference: faster, by a factor
    that grows with the dimension, but other arithmetic (other outputs);
  - cluster_embeddings.py as a whole process: wall time, peak RSS (largest process, and the sampled
    sum over the script and its workers), and its ratio to the floor;
  - clusters.png: what importing matplotlib and drawing it cost (a worker does it while the others write
    the cluster files);
  - sorting and writing the cluster files from one assignment: dbpkit.kmeans.write_clusters against
    SemDeDup's own approach (one full-table filter per cluster, rows built as Python tuples, sorted
    and saved with np.save), on the assignment the script produced.

    python benchmarks/bench_cluster.py --rows 2000000 --dim 64 --clusters 500
    python benchmarks/bench_cluster.py --rows 20000000 --skip-semdedup      # memory at scale
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from bench_pipeline import machine, mark_generated, measure, needs_generating, warm_cache  # noqa: E402

CONCEPTS = 2000
GENERATE_ROWS = 1 << 20
FLOOR = """
import sys, time, numpy as np, faiss
path, k, niter, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
faiss.omp_set_num_threads(threads)
if sys.argv[6] == "own loop":  # as dbpkit.kmeans.exact_faiss
    faiss.cvar.distance_compute_blas_threshold = 1 << 30
x = np.load(path, mmap_mode="r")
n = len(x)
sample = min(n, 256 * k)
rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
train = x[rows].astype(np.float32)
train /= np.linalg.norm(train, axis=1, keepdims=True)
kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=-(-sample // k))
kmeans.train(train)
for start in range(0, n, 1 << 16):
    chunk = x[start:start + (1 << 16)].astype(np.float32)
    chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
    kmeans.index.search(chunk, 1)
"""
OURS = """
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from dbpkit import kmeans, tasks
work, out, k, workers = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
labels = np.load(f"{work}/labels.npy")
start = time.perf_counter()
with tasks.TaskPool(workers) as pool:
    kmeans.write_clusters(out, work, labels, k, True, pool)
print(time.perf_counter() - start)
"""
FIGURE = """
import glob, json, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from dbpkit.cluster_report import write_clusters_figure
save, out = sys.argv[2], sys.argv[3]
sizes = np.array([np.load(f"{save}/sorted_clusters/cluster_{j}.npy", mmap_mode="r").shape[0]
                  for j in range(len(glob.glob(save + "/sorted_clusters/cluster_*.npy")))])
record = json.load(open(save + "/clustering.json"))
start = time.perf_counter()
import matplotlib.figure
imported = time.perf_counter()
write_clusters_figure((out, sizes, record["kmeans_objective"]))
print(json.dumps({"import_s": imported - start, "draw_s": time.perf_counter() - imported}))
"""
SEMDEDUP = """
import sys, time, numpy as np, pandas as pd
work, keys, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
labels, distances = np.load(f"{work}/labels.npy"), np.load(f"{work}/distances.npy")
paths = open(keys).read().split("\\n")[:-1]
start = time.perf_counter()
# SemDeDup's rank_within_cluster (clustering/sort_clusters.py), its spherical cosine branch, re-typed here.
dist_df = pd.DataFrame({"paths_list": paths, "nearest_cent": labels, "dist_to_cent": 1 - distances})
for c in range(k):
    cluster_df = dist_df.loc[dist_df["nearest_cent"] == c]
    items = list(cluster_df.index)
    dists = list(1 - cluster_df["dist_to_cent"])
    label = np.full(len(cluster_df), c).tolist()
    rows = sorted(zip(list(cluster_df["paths_list"]), items, dists, label), key=lambda x: x[2], reverse=True)
    np.save(f"{out}/cluster_{c}.npy", rows)
print(time.perf_counter() - start)
"""


def generate(folder: str, rows: int, dim: int, seed: int) -> None:
    """float16 embeddings around CONCEPTS directions (of varied spread) and LAION-style keys, written in chunks."""
    spec = {"rows": rows, "dim": dim, "seed": seed}
    if not needs_generating(folder, spec):
        return
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CONCEPTS, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = rng.uniform(0.3, 1.2, CONCEPTS)
    x = np.lib.format.open_memmap(os.path.join(folder, "emb.npy"), "w+", np.float16, (rows, dim))
    with open(os.path.join(folder, "keys.txt"), "w") as keys:
        for start in range(0, rows, GENERATE_ROWS):
            n = min(GENERATE_ROWS, rows - start)
            concept = rng.integers(0, CONCEPTS, n)
            x[start:start + n] = centers[concept] + rng.standard_normal((n, dim)) * spread[concept, None] / np.sqrt(dim)
            keys.write("".join(f"{i // 10000:05d}/{i:09d}.jpg\n" for i in range(start, start + n)))
            print(f"\rgenerating: {start + n:,}/{rows:,} rows", end="", file=sys.stderr)
    print(file=sys.stderr)
    x.flush()
    del x
    mark_generated(folder, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="embeddings (default: 2M)")
    parser.add_argument("--dim", type=int, default=64, help="dimension (default: 64)")
    parser.add_argument("--clusters", type=int, default=500, help="k (default: 500)")
    parser.add_argument("--niter", type=int, default=100, help="k-means iterations (default: 100)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="--workers (default: all cores)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"),
                        help="folder for the generated data (reused when it matches)")
    parser.add_argument("--skip-semdedup", action="store_true", help="skip SemDeDup's sort (slow at large sizes)")
    args = parser.parse_args()

    data = os.path.join(args.data, f"emb_{args.rows}_{args.dim}")
    generate(data, args.rows, args.dim, 0)
    warm_cache(data)
    work = tempfile.mkdtemp(prefix="dbp_bench_cluster_")
    py = sys.executable
    emb, keys = os.path.join(data, "emb.npy"), os.path.join(data, "keys.txt")
    print(machine())
    print(f"data: {args.rows:,} x {args.dim} float16 ({os.path.getsize(emb) / 1e9:.2f} GB), k = {args.clusters}, "
          f"niter {args.niter}, sample {min(args.rows, 256 * args.clusters):,} rows, --workers {args.workers}\n")

    floor_args = [py, "-c", FLOOR, emb, str(args.clusters), str(args.niter), str(args.seed), str(args.workers)]
    floor = measure([*floor_args, "own loop"])
    blas = measure([*floor_args, "blas"])
    script = measure([py, os.path.join(ROOT, "cluster_embeddings.py"), "--embeddings", emb, "--keys", keys,
                      "--num_clusters", str(args.clusters), "--niter", str(args.niter), "--seed", str(args.seed),
                      "--save_folder", f"{work}/save", "--workers", str(args.workers)])
    print(f"{'step':40s} {'wall s':>8s} {'x floor':>8s} {'peak RSS MB':>12s} {'tree RSS MB':>12s}")
    for name, r in (("floor (read, train, search)", floor), ("cluster_embeddings.py", script),
                    ("the floor with BLAS (other arithmetic)", blas)):
        print(f"{name:40s} {r['wall_s']:8.2f} {r['wall_s'] / floor['wall_s']:8.2f} {r['peak_rss_mb']:12.0f} "
              f"{r['tree_rss_mb']:12.0f}")

    figure = json.loads(measure([py, "-c", FIGURE, ROOT, f"{work}/save", f"{work}/clusters.png"])["stdout"])
    print(f"\nclusters.png: {figure['import_s'] + figure['draw_s']:.2f} s (matplotlib's import "
          f"{figure['import_s']:.2f} s, drawing {figure['draw_s']:.2f} s), in a worker while the others write the "
          f"cluster files; the same bytes as the script's: "
          f"{open(f'{work}/clusters.png', 'rb').read() == open(f'{work}/save/clusters.png', 'rb').read()}")

    # The assignment the script made, read back from its files, for both ways of writing them.
    assignment = f"{work}/assignment"
    os.makedirs(assignment)
    labels = np.empty(args.rows, np.int32)
    distances = np.empty(args.rows, np.float32)
    for j in range(args.clusters):
        rows = np.load(f"{work}/save/sorted_clusters/cluster_{j}.npy")
        if rows.size:
            labels[rows[:, 1].astype(int)] = j
            distances[rows[:, 1].astype(int)] = rows[:, 2].astype(np.float32)
    np.save(f"{assignment}/labels.npy", labels)
    np.save(f"{assignment}/distances.npy", distances)
    sys.path.insert(0, ROOT)
    from dbpkit import layouts

    layouts.gather_keys(layouts.find_embeddings(emb, keys, None, "l14_img"), assignment)
    def write_with(snippet: str, *snippet_args: str) -> float:
        """Seconds one way of writing takes, into a fresh folder (the files are ~0.3 KB per row: the first
        write into a fresh page cache is slower, so each way runs twice, alternating, and keeps its best)."""
        out = f"{work}/out"
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        args = [a.replace("OUT", out) for a in snippet_args]
        return float(subprocess.run([py, "-c", snippet, *args], capture_output=True, text=True, check=True).stdout)

    ours_args = (ROOT, assignment, "OUT", str(args.clusters), str(args.workers))
    theirs_args = (assignment, keys, "OUT", str(args.clusters))
    ours, theirs = [], []
    for _ in range(2):
        ours.append(write_with(OURS, *ours_args))
        if not args.skip_semdedup:
            theirs.append(write_with(SEMDEDUP, *theirs_args))
    write_with(OURS, *ours_args)
    same = all(open(f"{work}/out/cluster_{j}.npy", "rb").read() ==
               open(f"{work}/save/sorted_clusters/cluster_{j}.npy", "rb").read() for j in range(args.clusters))
    print(f"\nsorting and writing the {args.clusters} cluster files from one assignment (best of 2):")
    print(f"  dbpkit.kmeans.write_clusters       {min(ours):8.2f} s  (files identical to the script's: {same})")
    if theirs:
        print(f"  SemDeDup's rank_within_cluster      {min(theirs):8.2f} s  ({min(theirs) / min(ours):.1f}x ours)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
