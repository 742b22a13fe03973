"""Benchmark reading embedding rows by index, the two ways dbpkit.files.read_rows knows, and the one it picks.

A cluster's rows (deduplicate.py), k-means' training sample and --subset's rows are read by index. Read run by run,
each run of consecutive rows costs a seek and a read; mapped a window of the file at a time, each page fault brings
in 64 KB around it (the rows close by share it). Which is cheaper depends on how far apart the rows lie (and, in
between, on the file and the page cache): this measures both ways over a grid of distances and widths, each time
into a new array and on other rows (the median of REPEATS), and what read_rows' rule (FEW_RUNS, SPARSE_BYTES)
picks, as a ratio to the better way, in one run.

    python benchmarks/bench_read.py   # 256 MB files of float32 rows at dim 64, 256 and 768 (written once)
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from bench_pipeline import machine, mark_generated, needs_generating, warm_cache  # noqa: E402

from dbpkit import files  # noqa: E402

APART_KB = (2, 4, 8, 16, 32, 64, 256)  # average distance from one row to the next
REPEATS = 5  # draws of rows for each way; the median time kept


def generate(folder: str, dim: int, megabytes: int) -> str:
    """A .npy of random float32 rows, `megabytes` large."""
    spec = {"dim": dim, "megabytes": megabytes}
    path = os.path.join(folder, "emb.npy")
    if needs_generating(folder, spec):
        rows = (megabytes << 20) // (dim * 4)
        x = np.lib.format.open_memmap(path, "w+", np.float32, (rows, dim))
        x[:] = np.random.default_rng(0).standard_normal((rows, dim), np.float32)
        x.flush()
        del x
        mark_generated(folder, spec)
    return path


def rows_apart(count: int, total: int, seed: list[int]) -> np.ndarray:
    """`count` sorted rows drawn from `total`."""
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def one_point(path: str, apart_kb: int) -> tuple[int, float, float, str]:
    """Rows `apart_kb` apart on average in the file: how many, the median seconds of each way over REPEATS draws
    of rows (each into a new array, as every caller reads), and the way read_rows picks."""
    x = np.load(path, mmap_mode="r")
    shape, dtype, offset = x.shape, x.dtype, x.offset
    row_bytes = shape[1] * dtype.itemsize
    count = min(shape[0], shape[0] * row_bytes // (apart_kb << 10))
    times = {"runs": [], "mapped": []}
    for repeat in range(REPEATS):
        rows = rows_apart(count, shape[0], [apart_kb, repeat])
        for way in times:
            out = np.empty((count, shape[1]), np.float32)
            start = time.perf_counter()
            if way == "runs":
                files._read_runs(path, offset, dtype, row_bytes, rows, files.run_ends(rows), out)
            else:
                files._map_windows(path, offset, dtype, shape, rows, out)
            times[way].append(time.perf_counter() - start)
    rows = rows_apart(count, shape[0], [apart_kb, 0])
    picked = "runs" if files.reads_better(rows, files.run_ends(rows), row_bytes) else "mapped"
    return count, float(np.median(times["runs"])), float(np.median(times["mapped"])), picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256, help="size of each file (default: 256)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"))
    args = parser.parse_args()
    print(machine())
    print(f"{'dim':>4s} {'apart':>7s} {'rows':>8s} {'runs ms':>9s} {'mapped ms':>10s} {'picked':>8s} "
          f"{'picked / better':>16s}")
    worst = 1.0
    for dim in (64, 256, 768):
        path = generate(os.path.join(args.data, f"read_{dim}_{args.megabytes}mb"), dim, args.megabytes)
        warm_cache(os.path.dirname(path))
        for apart_kb in APART_KB:
            count, runs, mapped, picked = one_point(path, apart_kb)
            ratio = (runs if picked == "runs" else mapped) / min(runs, mapped)
            worst = max(worst, ratio)
            print(f"{dim:4d} {apart_kb:5d}KB {count:8d} {runs * 1e3:9.1f} {mapped * 1e3:10.1f} {picked:>8s} "
                  f"{ratio:15.2f}x")
    print(f"\nread_rows' pick against the better way, worst case over the grid: {worst:.2f}x")


if __name__ == "__main__":
    main()
