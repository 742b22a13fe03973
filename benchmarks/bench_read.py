"""Benchmark reading embedding rows by index, the two ways dbpkit.files.read_rows knows, and the one it picks.

A cluster's rows (deduplicate.py), k-means' training sample and --subset's rows are read by index. Read run by run,
each run of consecutive rows costs a seek and a read; mapped a window of the file at a time, each page fault brings
in 64 KB around it (the rows close by share it). Which is cheaper depends on how far apart the rows lie (and, in
between, on the file and the page cache): this measures both ways over a grid of distances and widths, each time
into a new array and on other rows (the median of REPEATS), and what read_rows' rule (FEW_RUNS, SPARSE_BYTES)
picks, as a ratio to the better way, in one run.

With --cold the file is dropped from the page cache before every read (Linux), as embeddings larger than RAM
(LAION's) are read from disk, and the runs are also read without being asked for ahead (files.ask_ahead), to show
what that saves.

    python benchmarks/bench_read.py          # 256 MB files of float32 rows at dim 64, 256 and 768 (written once)
    python benchmarks/bench_read.py --cold   # the same from disk
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from bench_pipeline import drop_from_cache, machine, mark_generated, needs_generating, warm_cache  # noqa: E402

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


def read_way(way: str, path: str, header: tuple, rows: np.ndarray, out: np.ndarray) -> None:
    shape, dtype, _, offset = header
    if way == "mapped":
        with open(path, "rb", buffering=0) as f:
            files._map_windows(f, path, offset, dtype, shape, rows, out)
        return
    # read_rows, made to read every run (SPARSE_BYTES 0), asking for them first or not
    saved = files.SPARSE_BYTES, files.WILL_NEED
    files.SPARSE_BYTES, files.WILL_NEED = 0, (files.WILL_NEED if way == "runs" else None)
    try:
        files.read_rows(path, offset, dtype, shape, rows, out)
    finally:
        files.SPARSE_BYTES, files.WILL_NEED = saved


def one_point(path: str, apart_kb: int, ways: tuple[str, ...], cold: bool) -> tuple[int, dict[str, float], str]:
    """Rows `apart_kb` apart on average in the file: how many, the median seconds of each way over REPEATS draws
    of rows (each into a new array, as every caller reads), and the way read_rows picks."""
    header = files.read_npy_header(path)  # (no mapping kept: a page this process maps stays in the page cache)
    shape, row_bytes = header[0], header[0][1] * header[1].itemsize
    count = min(shape[0], shape[0] * row_bytes // (apart_kb << 10))
    times = {way: [] for way in ways}
    for repeat in range(REPEATS):
        rows = rows_apart(count, shape[0], [apart_kb, repeat])
        for way in ways:
            out = np.empty((count, shape[1]), np.float32)
            if cold:
                drop_from_cache(path)
            start = time.perf_counter()
            read_way(way, path, header, rows, out)
            times[way].append(time.perf_counter() - start)
            assert np.array_equal(out, np.load(path, mmap_mode="r")[rows])  # (the mapping gone at once)
    rows = rows_apart(count, shape[0], [apart_kb, 0])
    runs = 1 + int(np.count_nonzero(np.diff(rows) != 1))
    picked = "runs" if files.reading_suits(runs, int(rows[-1] - rows[0]) + 1, row_bytes) else "mapped"
    return count, {way: float(np.median(t)) for way, t in times.items()}, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256, help="size of each file (default: 256)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"))
    parser.add_argument("--cold", action="store_true", help="drop the file from the page cache before each read")
    args = parser.parse_args()
    print(machine())
    if args.cold and not hasattr(os, "posix_fadvise"):
        print("--cold: this system cannot drop a file from the page cache (no posix_fadvise); skipped")
        return
    ways = ("runs", "runs unasked", "mapped") if args.cold else ("runs", "mapped")
    print(f"page cache: {'dropped before each read' if args.cold else 'warm'}\n")
    print(f"{'dim':>4s} {'apart':>7s} {'rows':>8s} " + " ".join(f"{way + ' ms':>15s}" for way in ways)
          + f" {'picked':>8s} {'picked / better':>16s}")
    worst, unasked = 1.0, []
    for dim in (64, 256, 768):
        path = generate(os.path.join(args.data, f"read_{dim}_{args.megabytes}mb"), dim, args.megabytes)
        if not args.cold:
            warm_cache(os.path.dirname(path))
        for apart_kb in APART_KB:
            count, times, picked = one_point(path, apart_kb, ways, args.cold)
            ratio = times[picked] / min(times["runs"], times["mapped"])
            worst = max(worst, ratio)
            if args.cold:
                unasked.append(times["runs unasked"] / times["runs"])
            print(f"{dim:4d} {apart_kb:5d}KB {count:8d} " + " ".join(f"{times[way] * 1e3:15.1f}" for way in ways)
                  + f" {picked:>8s} {ratio:15.2f}x")
    print(f"\nread_rows' pick against the better way, worst case over the grid: {worst:.2f}x")
    if unasked:
        print(f"runs read without asking ahead / asked ahead: {min(unasked):.2f}x to {max(unasked):.2f}x")


if __name__ == "__main__":
    main()
