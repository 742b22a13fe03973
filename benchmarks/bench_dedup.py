"""Benchmark deduplicate.py against SemDeDup's own scoring and against a bare matmul.

Generates SemDeDup-style sorted clusters and the embeddings they index (reused when already there), warms
the page cache, then measures in one run:
  - deduplicate.py as a whole process (Python, imports and all): wall time, peak RSS of the largest process
    and of the process tree; in a second run, not timed, the tree's PSS (shared pages counted once);
  - SemDeDup's semdedup() loop over the same clusters, re-typed from its semdedup.py (the full similarity
    matrix, its diagonal zeroed, its upper triangle copied, the column maxima), imports excluded;
  - torch's full-square X @ X.T of each cluster, the matmuls timed inside their process: the GEMM floor of
    SemDeDup's way; and that process whole (Python, torch's import, each cluster read), to set beside ours;
  - deduplicate.py and that process run in turn, --repeats times each (this machine's speed drifts by a tenth
    from one minute to the next): the median of each side, and the ratio of each pair run one after the other;
  - the scores: deduplicate.py's against SemDeDup's M, the largest difference;
  - one large cluster alone (memory: never an n x n matrix);
  - the scoring stage's matmul rate (the multiply-adds of its blocks over the stage's time in logs.log)
    against the device's own GEMM rate on a block of the same shape: on the CPU (a thread per worker), and
    with --device cuda where torch sees a GPU (float16); on a machine without one it says so and skips.

    python benchmarks/bench_dedup.py                               # 60 clusters x 5,000 rows, dim 256
    python benchmarks/bench_dedup.py --large 75000 --large-dim 32   # and one 75k-row cluster
    python benchmarks/bench_dedup.py --scattered   # each cluster's rows spread over the file, as in LAION's
    python benchmarks/bench_dedup.py --scattered --parts 2000   # ... and read from clip-retrieval's parts
    python benchmarks/bench_dedup.py --gaps 40 --cold   # from disk: see below

--gaps G writes G rows into the embeddings file for every clustered one, the others holes of a sparse file (no data,
no disk space), so that each row a cluster reads is a read of its own from disk, as in embeddings far larger than
RAM (LAION's); only deduplicate.py is measured then. --cold also measures deduplicate.py with the embeddings dropped
from the page cache first (Linux), against the warm run.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from bench_pipeline import (  # noqa: E402
    cuda_device,
    drop_from_cache,
    machine,
    mark_generated,
    measure,
    needs_generating,
    warm_cache,
)

from dbpkit.clusters import PARSER_MODULES  # noqa: E402
from dbpkit.dedup import BLOCK_ROWS, STRIP_COLUMNS, strips_match  # noqa: E402

SEMDEDUP = """
import glob, json, sys, time, numpy as np, torch
folder, k = sys.argv[1], int(sys.argv[2])
embs = np.load(folder + "/emb.npy", mmap_mode="r")
loop = 0.0
scores = {}
for j in range(k):
    cluster = np.load(f"{folder}/sorted_clusters/cluster_{j}.npy")
    start = time.perf_counter()
    # SemDeDup's semdedup.py, per cluster: its representations, the full matrix, the upper triangle, the maxima.
    reps = torch.tensor(embs[cluster[:, 1].astype("int32")])
    sims = reps @ reps.T
    sims.fill_diagonal_(0.0)
    upper = torch.triu(sims, diagonal=1)
    m = torch.max(upper, dim=0)[0]
    loop += time.perf_counter() - start
    scores[j] = m.numpy()
np.savez(folder + "/semdedup_scores.npz", **{str(j): s for j, s in scores.items()})
print(json.dumps({"loop_s": loop}))
"""
SQUARE_PROCESS = """
import json, sys, time, numpy as np, torch
folder, k = sys.argv[1], int(sys.argv[2])
embs = np.load(folder + "/emb.npy", mmap_mode="r")
square = 0.0
for j in range(k):  # each cluster read as SemDeDup reads it, then its full square (timed alone)
    cluster = np.load(f"{folder}/sorted_clusters/cluster_{j}.npy")
    reps = torch.from_numpy(embs[cluster[:, 1].astype("int64")])
    start = time.perf_counter()
    reps @ reps.T
    square += time.perf_counter() - start
print(json.dumps({"square_s": square, "threads": torch.get_num_threads()}))
"""
# The workers' fork server's imports, timed as it pays them: inside the process (one that imports torch and then
# exits also pays torch's teardown, ~0.3 s, which the fork server skips). Besides torch: numpy, this project's
# modules that deduplicate.py imports, and the parsers' Arrow.
FORK_SERVER_IMPORTS = """
import importlib, json, sys, time
sys.path.insert(0, sys.argv[1])
start = time.perf_counter()
import numpy, deduplicate
ours = time.perf_counter()
import torch
torch_s = time.perf_counter() - ours
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps({"total_s": time.perf_counter() - start, "torch_s": torch_s}))
"""
GEMM = """
import json, sys, time, torch
device, dim, block, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(1)  # as each deduplicate.py worker
dtype = torch.float16 if device == "cuda" else torch.float32  # as deduplicate.py on each device
a, b = (torch.randn(block, dim, device=device, dtype=dtype) for _ in range(2))
out = torch.empty(block, block, device=device, dtype=dtype)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
for _ in range(3):
    torch.mm(a, b.T, out=out)
sync()
calls, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    for _ in range(10):
        torch.mm(a, b.T, out=out)
    calls += 10
    sync()
print(json.dumps({"macs_per_s": calls * block * block * dim / (time.perf_counter() - start)}))
"""
GEMM_SECONDS = 2.0


def block_macs(sizes: list[int], dim: int, strips: bool) -> int:
    """The multiply-adds of deduplicate.py's blocks: per cluster, each block of rows against each earlier block of
    columns, and its diagonal block (as strips from each one's diagonal down, where a full block is cut so)."""
    total = 0
    for n in sizes:
        for r0 in range(0, n, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, n - r0)
            total += rows * r0 * dim
            if strips and rows == BLOCK_ROWS:
                total += sum((BLOCK_ROWS - s) * STRIP_COLUMNS for s in range(0, BLOCK_ROWS, STRIP_COLUMNS)) * dim
            else:
                total += rows * rows * dim
    return total


def median(runs: list[dict], by: str) -> dict:
    """The run whose `by` is the median of the runs' (of an even number, the upper one)."""
    return sorted(runs, key=lambda run: run[by])[len(runs) // 2]


def stage_times(log: str) -> dict[str, float]:
    """When the run reached each stage, from its logs.log (seconds since the epoch)."""
    import datetime

    times = {}
    for line in open(log):
        if " INFO stage: " in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times[line.split(" INFO stage: ", 1)[1].strip()] = stamp.timestamp()
    return times


def stage_seconds(log: str, first: str, last: str) -> float:
    """Seconds between two stages in a run's logs.log."""
    times = stage_times(log)
    return times[last] - times[first]


def scoring_rate(data: str, run: str, device: str, workers: int, sizes: list[int], dim: int) -> None:
    """The scoring stage's matmul rate against the device's GEMM rate on deduplicate.py's block shape."""
    scored = stage_seconds(os.path.join(run, "logs.log"), "score started", "scored")
    import torch

    torch.set_num_threads(1)  # as in each worker, where the probe runs
    strips = strips_match(BLOCK_ROWS, dim, torch.float16 if device == "cuda" else torch.float32, torch.device(device))
    rate = block_macs(sizes, dim, strips) / scored
    gemm = json.loads(measure([sys.executable, "-c", GEMM, device, str(dim), str(BLOCK_ROWS),
                               str(GEMM_SECONDS)])["stdout"])["macs_per_s"]
    device_rate = gemm * (workers if device == "cpu" else 1)  # the CPU's: a core per worker; a GPU is shared
    print(f"scoring on {device}: {rate / 1e9:.1f} G multiply-adds/s in its stage ({scored:.2f} s); the "
          f"device's GEMM on a {BLOCK_ROWS} x {dim} block: {device_rate / 1e9:.1f} G/s"
          f"{f' ({workers} threads, one per worker)' if device == 'cpu' else ''}: {rate / device_rate:.2f}x")


def key_of(row: int) -> str:
    """The key of the embeddings' row `row`, in the cluster files and in clip-retrieval's metadata alike."""
    return f"{row // 10000:05d}/{row:09d}.jpg"


def generate(folder: str, clusters: int, rows: int, dim: int, seed: int, scattered: bool = False,
             parts: int = 0, gaps: int = 1) -> None:
    """Embeddings in `clusters` groups (a quarter of each group near-repeats an earlier member), already unit
    length as SemDeDup expects them, and the groups' sorted cluster files, farthest first. A group's rows are
    consecutive in the embeddings file, or, `scattered`, spread over all of it in a random order, as k-means
    clusters lie in a web-scale dataset. With `parts`, the same rows also in clip-retrieval's layout of that
    many parts (LAION's releases: thousands of them). With `gaps`, every gaps-th row of the file is a member,
    the rows between them holes."""
    spec = {"clusters": clusters, "rows": rows, "dim": dim, "seed": seed, **({"scattered": True} if scattered else {}),
            **({"parts": parts} if parts else {}), **({"gaps": gaps} if gaps > 1 else {})}
    if not needs_generating(folder, spec):
        return
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "sorted_clusters"))
    x = np.lib.format.open_memmap(os.path.join(folder, "emb.npy"), "w+", np.float32, (clusters * rows * gaps, dim))
    where = (rng.permutation(clusters * rows) if scattered else np.arange(clusters * rows)) * gaps  # each member's row
    for j in range(clusters):
        center = rng.standard_normal(dim)
        members = center / np.linalg.norm(center) + rng.standard_normal((rows, dim)) * 0.8 / np.sqrt(dim)
        repeat = rng.random(rows) < 0.25
        members[repeat] = members[rng.integers(0, rows, repeat.sum())] + rng.standard_normal((repeat.sum(), dim)) * \
            0.05 / np.sqrt(dim)
        members /= np.linalg.norm(members, axis=1, keepdims=True)
        distance = 1 - members @ (center / np.linalg.norm(center))
        order = np.argsort(-distance)
        at = where[j * rows:(j + 1) * rows]
        x[at] = members
        np.save(os.path.join(folder, "sorted_clusters", f"cluster_{j}.npy"),
                [(key_of(at[i]), at[i], float(distance[i]), j) for i in order])
        print(f"\rgenerating: cluster {j + 1}/{clusters}", end="", file=sys.stderr)
    print(file=sys.stderr)
    x.flush()
    del x
    if parts:
        write_parts(folder, parts)
    mark_generated(folder, spec)


def write_parts(folder: str, parts: int) -> None:
    """emb.npy's rows as clip-retrieval writes them: img_emb/img_emb_<n>.npy with metadata/metadata_<n>.parquet."""
    import pandas as pd

    x = np.load(os.path.join(folder, "emb.npy"), mmap_mode="r")
    for name in ("img_emb", "metadata"):
        os.makedirs(os.path.join(folder, name))
    bounds = np.linspace(0, len(x), parts + 1).astype(int)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(os.path.join(folder, "img_emb", f"img_emb_{n}.npy"), x[a:b])
        keys = pd.DataFrame({"image_path": [key_of(row) for row in range(a, b)]})
        keys.to_parquet(os.path.join(folder, "metadata", f"metadata_{n}.parquet"))


def warm(folder: str, gaps: int) -> None:
    """The data into the page cache; of a file with gaps only its members' rows (reading its holes would fill the
    page cache with zeros)."""
    if gaps == 1:
        return warm_cache(folder)
    warm_cache(os.path.join(folder, "sorted_clusters"))
    float(np.load(os.path.join(folder, "emb.npy"), mmap_mode="r")[::gaps, 0].sum())


def ours(folder: str, out: str, workers: int, device: str = "cpu", pss: bool = False) -> dict:
    """deduplicate.py measured as a whole process, on the data's clip-retrieval parts where it has them;
    "launched" is when it was started (seconds since the epoch, as its logs.log stamps its stages). With `pss`,
    the memory of its process tree too, shared pages counted once (a run that is not timed)."""
    parts = os.path.join(folder, "img_emb")
    launched = time.time()
    return {"launched": launched, **measure(
        [sys.executable, os.path.join(ROOT, "deduplicate.py"), "--sorted_clusters_path",
         os.path.join(folder, "sorted_clusters"), "--embeddings",
         parts if os.path.isdir(parts) else os.path.join(folder, "emb.npy"),
         "--eps", "0.01", "0.05", "0.1", "--save_folder", out, "--workers", str(workers), "--device", device],
        pss)}


def from_disk(data: str, out: str, workers: int, warm_s: float, warm_scored: float) -> None:
    """deduplicate.py again, its embeddings dropped from the page cache first: against the warm run."""
    if not hasattr(os, "posix_fadvise"):
        print("--cold: this system cannot drop a file from the page cache (no posix_fadvise); skipped")
        return
    parts = os.path.join(data, "img_emb")
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        drop_from_cache(os.path.join(parts, name))
    drop_from_cache(os.path.join(data, "emb.npy"))
    cold = ours(data, out, workers)
    scored = stage_seconds(os.path.join(out, "logs.log"), "score started", "scored")
    print(f"from disk (the embeddings dropped from the page cache first): deduplicate.py {cold['wall_s']:.2f} s, "
          f"{cold['wall_s'] / warm_s:.2f}x the run above; its scoring stage {scored:.2f} s, "
          f"{scored / warm_scored:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=60)
    parser.add_argument("--rows", type=int, default=5000, help="rows per cluster (default: 5000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--scattered", action="store_true",
                        help="each cluster's rows spread over the whole embeddings file (as in LAION's), not together")
    parser.add_argument("--parts", type=int, default=0,
                        help="deduplicate.py reads the rows from this many clip-retrieval parts (LAION's layout)")
    parser.add_argument("--gaps", type=int, default=1,
                        help="G rows in the embeddings file per member, the others holes (see above; implies "
                             "--scattered)")
    parser.add_argument("--cold", action="store_true",
                        help="also run deduplicate.py with the embeddings dropped from the page cache first")
    parser.add_argument("--large", type=int, default=0, help="also one cluster of this many rows (e.g. 75000)")
    parser.add_argument("--large-dim", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="--workers (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of deduplicate.py and of the full squares, in turn (default: 3)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"),
                        help="folder for the generated data (reused when it matches)")
    args = parser.parse_args()
    if args.gaps < 1 or (args.gaps > 1 and args.parts):
        parser.error("--gaps: 1 or more, and not with --parts (the parts would hold the holes as data)")
    args.scattered |= args.gaps > 1

    print(machine())
    data = os.path.join(args.data, f"dedup_{args.clusters}x{args.rows}_{args.dim}{'_scattered' * args.scattered}"
                                   f"{f'_{args.parts}parts' * bool(args.parts)}{f'_gaps{args.gaps}' * (args.gaps > 1)}")
    generate(data, args.clusters, args.rows, args.dim, 0, args.scattered, args.parts, args.gaps)
    warm(data, args.gaps)
    work = tempfile.mkdtemp(prefix="dbp_bench_dedup_")
    print(f"data: {args.clusters} clusters x {args.rows:,} rows, dim {args.dim}"
          f"{', each spread over the whole file' if args.scattered else ''}"
          f"{f', read from {args.parts} clip-retrieval parts' if args.parts else ''}"
          f"{f', {args.gaps} rows of the file per member' if args.gaps > 1 else ''}; --workers {args.workers}\n")
    if args.gaps > 1:  # (the baselines map the whole file: each fault would bring in its holes as pages of zeros)
        script = ours(data, os.path.join(work, "dedup"), args.workers)
        scored = stage_seconds(os.path.join(work, "dedup", "logs.log"), "score started", "scored")
        print(f"deduplicate.py, whole process: {script['wall_s']:.2f} s, its scoring stage {scored:.2f} s "
              "(SemDeDup's loop and the matmul floor are not measured with --gaps)")
        if args.cold:
            from_disk(data, os.path.join(work, "dedup_cold"), args.workers, script["wall_s"], scored)
        return
    # deduplicate.py and the full squares in turn, --repeats times each (this machine's speed drifts by a tenth
    # from one minute to the next): the median of each side, and the ratio of each pair run together
    runs, squares = [], []
    for i in range(args.repeats):
        runs.append({**ours(data, os.path.join(work, f"dedup_{i}"), args.workers), "folder": f"dedup_{i}"})
        square = measure([sys.executable, "-c", SQUARE_PROCESS, data, str(args.clusters)])
        squares.append({**square, **json.loads(square["stdout"])})
    script, square = median(runs, "wall_s"), median(squares, "wall_s")
    floor = median(squares, "square_s")["square_s"]
    pairs = sorted(run["wall_s"] / sq["square_s"] for run, sq in zip(runs, squares))
    theirs = measure([sys.executable, "-c", SEMDEDUP, data, str(args.clusters)])
    times = json.loads(theirs["stdout"])
    print(f"{'step (the median of ' + str(args.repeats) + ' runs where repeated)':52s} {'s':>8s} {'peak RSS MB':>12s} "
          f"{'tree RSS MB':>12s}")
    print(f"{'deduplicate.py, whole process (imports included)':52s} {script['wall_s']:8.2f} "
          f"{script['peak_rss_mb']:12.0f} {script['tree_rss_mb']:12.0f}")
    print(f"{'SemDeDup semdedup() loop (imports excluded; once)':52s} {times['loop_s']:8.2f} "
          f"{theirs['peak_rss_mb']:12.0f}")
    print(f"{'torch X @ X.T per cluster (timed inside its process)':52s} {floor:8.2f}")
    print(f"{'the same, whole process (imports, reading included)':52s} {square['wall_s']:8.2f} "
          f"{square['peak_rss_mb']:12.0f}")
    print(f"\ndeduplicate.py / SemDeDup's loop: {script['wall_s'] / times['loop_s']:.2f}x;"
          f" / the full-square matmuls: {script['wall_s'] / floor:.2f}x (each pair run together: "
          f"{' '.join(f'{r:.2f}x' for r in pairs)}; torch on {square['threads']} threads there); whole process to "
          f"whole process: {script['wall_s'] / square['wall_s']:.2f}x")
    # Where the median run's time went. Before the first cluster: Python, the imports, and torch's import in
    # the workers' fork server (the floor, timed inside its process, counts none of it). After the last:
    # gathering each cluster's selection at every eps (its scoring task made them) into the kept keys, then the
    # report (similarity.png, drawn by matplotlib) and the process's exit.
    stages = stage_times(os.path.join(work, script["folder"], "logs.log"))
    before = stages["score started"] - script["launched"]
    scored = stages["scored"] - stages["score started"]
    gathered = stages["writing the report"] - stages["scored"]
    report = script["wall_s"] - before - scored - gathered
    imports = json.loads(measure([sys.executable, "-c", FORK_SERVER_IMPORTS, ROOT, *PARSER_MODULES])["stdout"])
    print(f"where its {script['wall_s']:.2f} s went: {before:.2f} s until the workers took the first cluster "
          f"(the workers' fork server's imports: {imports['total_s']:.2f} s, torch's {imports['torch_s']:.2f} s "
          f"of it), {scored:.2f} s scoring ({scored / floor:.2f}x the "
          f"full-square matmuls), {gathered:.2f} s gathering the selections into the kept keys, {report:.2f} s "
          f"writing the report (similarity.png) and exiting")
    shared = ours(data, os.path.join(work, "dedup_memory"), args.workers, pss=True)
    print(f"deduplicate.py's process tree, each page shared among its processes counted once (PSS; in a run of its "
          f"own, not timed): {shared['tree_pss_mb']:.0f} MB at its peak (summed RSS, counting each once per process "
          f"that maps it: {shared['tree_rss_mb']:.0f} MB)")
    semdedup = np.load(os.path.join(data, "semdedup_scores.npz"))
    worst = max(float(np.abs(np.load(os.path.join(work, script["folder"], "scores", f"cluster_{j}.npy")) -
                             semdedup[str(j)]).max()) for j in range(args.clusters))
    print(f"largest difference between the two scores (float32, summed in another order): {worst:.2e}\n")
    sizes = [args.rows] * args.clusters
    scoring_rate(data, os.path.join(work, script["folder"]), "cpu", args.workers, sizes, args.dim)
    if args.cold:
        from_disk(data, os.path.join(work, "dedup_cold"), args.workers, script["wall_s"], scored)
    gpu = cuda_device()
    if gpu is None:
        print("--device cuda: torch sees no CUDA device on this machine; skipped")
    else:
        cuda = ours(data, os.path.join(work, "dedup_cuda"), args.workers, "cuda")
        print(f"--device cuda ({gpu}): deduplicate.py {cuda['wall_s']:.2f} s, whole process")
        scoring_rate(data, os.path.join(work, "dedup_cuda"), "cuda", args.workers, sizes, args.dim)

    if args.large:
        large = os.path.join(args.data, f"dedup_1x{args.large}_{args.large_dim}")
        generate(large, 1, args.large, args.large_dim, 1)
        warm_cache(large)
        one = ours(large, os.path.join(work, "large"), args.workers, pss=True)
        print(f"\none cluster of {args.large:,} rows, dim {args.large_dim}: {one['wall_s']:.2f} s (memory sampled "
              f"as it ran), peak RSS {one['peak_rss_mb']:.0f} MB (largest process), the tree's "
              f"{one['tree_pss_mb']:.0f} MB (PSS; {one['tree_rss_mb']:.0f} MB summed RSS); its full matrix alone "
              f"would be {args.large ** 2 * 4 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
