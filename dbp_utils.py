"""Shared code of the Density-Based Pruning (DBP) scripts.

The one home of: the SemDeDup cluster-file format (finding, validating and reading the files),
the method (complexity, softmax, the exact quota solver, selection inside a cluster), the
writers (atomic files, the save-dir protocol, the trie, the compact key set) and the loader
side (`load_trie`, `trie_search`, `load_kept_keys`, `webdataset_filter`).

faiss, pandas and matplotlib are imported inside the functions that need them, so the
scripts start fast in shell pipelines and a data loader importing this module stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import multiprocessing
import os
import pickle
import posixpath
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pygtrie
from tqdm import tqdm

# SemDeDup's sorted-cluster files: np.save of a list of (path, index, distance, cluster id).
PATH_COL, INDEX_COL, DIST_COL, CLUSTER_COL = 0, 1, 2, 3
NUM_COLS = 4
CLUSTER_FILE = re.compile(r"cluster_(0|[1-9][0-9]*)\.npy")
CENTROIDS_FILE = "kmeans_centroids.npy"
CHUNK_ROWS = 1 << 15  # rows read at a time (~16 MB), so a 560K-row cluster never sits in memory whole

DENSITIES = ("dintra*dinter", "dinter*dintra", "dintra", "dinter", "uniform", "clustersize")
WHICH_TO_KEEP = ("hard", "easy", "random")

# prune.py outputs; params.json is written last and marks a run as complete.
TRIE_FILE = "kept_keys_trie.pkl"
KEPT_KEYS_FILE = "kept_keys.npy"
KEPT_PATHS_FILE = "kept_paths.txt"
QUOTAS_FILE = "quotas.npy"
STATS_FILE = "cluster_stats.csv"
PLOT_FILE = "quotas.png"
LOG_FILE = "logs.log"
PARAMS_FILE = "params.json"
OUTPUT_FILES = (KEPT_PATHS_FILE, KEPT_KEYS_FILE, TRIE_FILE, QUOTAS_FILE, STATS_FILE, PLOT_FILE, LOG_FILE, PARAMS_FILE)
STAGING_DIR = ".dbp_staging"  # prune's outputs until the run completes
PARTIAL_SUFFIX = ".partial"  # a single output file until it is complete

TRIE_SEPARATOR = "/"
TRIE_VALUE = 1
PICKLE_PROTOCOL = 4
USAGE_EXIT = 2  # argparse's status for usage errors
PROGRESS_DELAY = 0.5  # seconds before a progress bar is drawn
PR_SET_PDEATHSIG = 1  # Linux prctl option: a signal for the child when its parent dies
TASKS_PER_WORKER = 8  # per-cluster tasks are handed out in about this many batches per worker

log = logging.getLogger("dbp")


# ---------------------------------------------------------------------------------------------
# Errors and command-line plumbing
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A user mistake: reported as `error: <where>: <what> (<fix>)`, exit status 2."""

    def __init__(self, where: str, what: str = "", fix: str = ""):
        # One positional form (the whole message) keeps the error picklable across workers.
        super().__init__(f"{where}: {what} ({fix})" if what else where)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's two-line usage error -> our one line
        if m := re.fullmatch(r"argument ([^/:]+)[^:]*: (.*)", message):
            raise UsageError(m[1], m[2], "see --help")
        if m := re.fullmatch(r"the following arguments are required: (.*)", message):
            raise UsageError(m[1], "is required", "see --help")
        if m := re.fullmatch(r"unrecognized arguments: (.*)", message):
            raise UsageError(m[1], "unrecognized argument", "see --help")
        raise UsageError(self.prog, message, "see --help")


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring and whose errors are one line."""
    parser = _Parser(description=doc, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (for bug reports)")
    return parser


def add_flag(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    """Add a flag under every spelling given plus its underscore and dash twins."""
    spellings: list[str] = []
    for name in names:
        word = name.removeprefix("--")
        for s in (word, word.replace("_", "-"), word.replace("-", "_")):
            if f"--{s}" not in spellings:
                spellings.append(f"--{s}")
    parser.add_argument(*spellings, dest=names[0].removeprefix("--").replace("-", "_"), **kwargs)


def add_workers_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--workers", type=int, default=None,
             help="processes for the per-cluster work (default: all cores); results are "
                  "identical for any value")


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main: user errors become one line on stderr and exit 2, never a traceback."""
    debug = "--debug" in sys.argv[1:]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        main()
    except UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        if debug:
            raise
        print(f"error: {e.filename or 'system'}: {e.strerror or e} (check the path, its "
              "permissions and free disk space)", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug: still one line unless --debug asks for the traceback
        if debug:
            raise
        print(f"error: internal: {type(e).__name__}: {e} (rerun with --debug and report it)",
              file=sys.stderr)
        sys.exit(1)


def check_range(flag: str, value: float, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False, fix: str = "") -> None:
    """Raise a UsageError unless low <(=) value <(=) high; NaN always fails."""
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(flag, f"{value!r} is outside {interval}", fix or f"pass a value in {interval}")


def num_workers(requested: int | None) -> int:
    if requested is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested < 1:
        raise UsageError("--workers", f"{requested} is less than 1", "pass 1 or more")
    return requested


def parallel_map(func: Callable[[Any], Any], tasks: list, workers: int, desc: str) -> Iterator[Any]:
    """func over tasks in order, spread over processes, with a tqdm bar on stderr."""
    # The bar appears after PROGRESS_DELAY s, so a bad file found early ends in its error line alone.
    bar = tqdm(total=len(tasks), desc=desc, unit="cluster", file=sys.stderr, delay=PROGRESS_DELAY)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield func(task)
                bar.update()
        else:
            ctx = multiprocessing.get_context("fork")  # children share the parent's pages
            chunk = max(1, len(tasks) // (workers * TASKS_PER_WORKER))  # fewer round trips, still balanced
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for result in pool.imap(func, tasks, chunksize=chunk):
                    yield result
                    bar.update()
    except BaseException:
        bar.leave = False  # clear the bar so the error line stands alone on a terminal
        raise
    finally:
        bar.close()


class Background:
    """A forked process for side work: `Background(func, *args)` forks at once, while the parent is
    still small (a fork shares, and is charged for, the parent's memory); `with` it, func runs beside
    the block, and leaving the block waits for it and re-raises its exception."""

    def __init__(self, func: Callable[..., None], *args: Any):
        ctx = multiprocessing.get_context("fork")
        go_reader, self._go = ctx.Pipe(duplex=False)
        self._result, result_writer = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=self._run, args=(os.getpid(), go_reader, result_writer, func, args),
                                 daemon=True)
        self._proc.start()

    @staticmethod
    def _run(parent: int, go, result, func: Callable[..., None], args: tuple) -> None:
        # Die with the parent: a killed run must not leave a writer behind to race its rerun.
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            if os.getppid() != parent or not go.recv():
                return
            func(*args)
            result.send(None)
        except EOFError:  # the parent went without starting us
            return
        except BaseException as e:  # handed to the parent, which reports it
            result.send(e)

    def __enter__(self) -> Background:
        self._go.send(True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._proc.terminate()
            self._proc.join()
            return
        error = self._result.recv() if self._result.poll(None) else None
        self._proc.join()
        if error is not None:
            raise error
        if self._proc.exitcode != 0:
            raise RuntimeError(f"background writer died with exit code {self._proc.exitcode}")


# ---------------------------------------------------------------------------------------------
# Input: SemDeDup's sorted cluster files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterFile:
    """One sorted cluster file, known from its .npy header alone."""

    path: str
    rows: int
    dtype: np.dtype | None = None  # str ('U') or bytes ('S'); None for an empty cluster
    offset: int = 0
    fortran: bool = False

    def columns(self, cols: tuple[int, ...], start: int, stop: int) -> list[np.ndarray]:
        """Columns `cols` of rows [start, stop), copied out of a mapping of just those rows: the kernel
        hands over page-cache pages without a copy, and unmapping keeps resident memory flat."""
        if stop <= start:
            return [np.zeros(0, self.dtype) for _ in cols]
        if self.fortran:  # column-major: each column is contiguous
            data = np.memmap(self.path, self.dtype, "r", self.offset, (self.rows, NUM_COLS), "F")
            return [np.array(data[start:stop, c]) for c in cols]
        row_bytes = NUM_COLS * self.dtype.itemsize
        first = self.offset + start * row_bytes
        base = first - first % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), first - base + (stop - start) * row_bytes,
                                                       access=mmap.ACCESS_READ, offset=base) as m:
                rows = np.frombuffer(m, self.dtype, (stop - start) * NUM_COLS, first - base).reshape(-1, NUM_COLS)
                values = [rows[:, c].copy() for c in cols]
                del rows  # release the mapping's buffer before it closes
        except (OSError, ValueError) as e:
            raise UsageError(self.path, f"cannot be read ({e})", "the file changed or is damaged; rewrite it") from None
        return values

    def chunks(self, cols: tuple[int, ...], start: int = 0, stop: int | None = None) -> Iterator[tuple[int, list]]:
        """(first row, columns) for rows [start, stop), CHUNK_ROWS at a time."""
        stop = self.rows if stop is None else stop
        for first in range(start, stop, CHUNK_ROWS):
            yield first, self.columns(cols, first, min(first + CHUNK_ROWS, stop))


def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file, refusing pickles and truncation."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, EOFError, SyntaxError) as e:
        raise UsageError(path, f"is not a readable .npy file ({e})",
                         "point at files written by np.save") from None
    except IsADirectoryError:
        raise UsageError(path, "is a folder, not a .npy file", "point at a .npy file") from None
    except OSError as e:
        raise UsageError(path, f"cannot be read: {e.strerror}", "check that it exists and its permissions") from None
    if dtype.hasobject:
        raise UsageError(path, "holds Python objects (a pickled .npy), which is never loaded",
                         "re-save it as a plain numeric or string array")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) < expected:
        raise UsageError(path, f"is truncated: {os.path.getsize(path)} bytes, the header "
                         f"promises {expected}", "rewrite the file")
    return tuple(shape), dtype, fortran, offset


def read_cluster_header(path: str) -> ClusterFile:
    """Validate a cluster file's header: an (n, 4) str/bytes array, or the (0,) of an empty cluster."""
    shape, dtype, fortran, offset = read_npy_header(path)
    if shape == (0,) or (len(shape) == 2 and shape[0] == 0):
        return ClusterFile(path, 0)
    if len(shape) != 2:
        raise UsageError(path, f"has shape {shape}; a cluster file is 2-D (rows, 4)",
                         "point at SemDeDup's sorted clusters")
    if shape[1] != NUM_COLS:
        raise UsageError(path, f"has {shape[1]} columns; expected 4 (path, index, distance, cluster id)",
                         "point at SemDeDup's sorted clusters")
    if dtype.kind not in "US":
        raise UsageError(path, f"has dtype {dtype}; expected a string array",
                         "save each cluster as np.save of a list of (path, index, distance, cluster) tuples")
    return ClusterFile(path, shape[0], dtype, offset, fortran)


def find_cluster_files(folder: str | None, k: int | None, folder_flag: str, k_flag: str) -> list[str]:
    """Paths of cluster_0.npy .. cluster_{k-1}.npy; k defaults to the number of files on disk."""
    if not folder:
        raise UsageError(folder_flag, "is required", "point it at SemDeDup's sorted clusters folder")
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(folder_flag, f"{folder} {what}", "point it at SemDeDup's sorted clusters folder")
    if k is not None and k < 1:
        raise UsageError(k_flag, f"{k} is less than 1", "pass the number of k-means clusters")
    ids = {int(m[1]) for name in os.listdir(folder) if (m := CLUSTER_FILE.fullmatch(name))}
    if not ids:
        raise UsageError(folder_flag, f"{folder} holds no cluster_<j>.npy files",
                         "point it at SemDeDup's sorted clusters folder")
    expected = k if k is not None else max(ids) + 1
    missing = sorted(set(range(expected)) - ids)
    extra = sorted(ids - set(range(expected)))
    if missing or extra:
        gaps = []
        if missing:
            gaps.append("missing " + _name_list(missing))
        if extra:
            gaps.append("unexpected " + _name_list(extra))
        claim = f"{k_flag} is {k}" if k is not None else f"the highest file is cluster_{max(ids)}.npy"
        raise UsageError(folder_flag, f"{claim} but {folder} holds {len(ids)} cluster files "
                         f"({'; '.join(gaps)})", f"cluster files must be exactly cluster_0..cluster_{expected - 1}"
                         f"; fix the folder or {k_flag}")
    return [os.path.join(folder, f"cluster_{j}.npy") for j in range(expected)]


def _name_list(ids: list[int], most: int = 5) -> str:
    names = ", ".join(f"cluster_{j}.npy" for j in ids[:most])
    return names + (f" and {len(ids) - most} more" if len(ids) > most else "")


def scan_clusters(folder: str | None, k: int | None, folder_flag: str, k_flag: str) -> list[ClusterFile]:
    """Find and validate every cluster file from its header (no rows are read)."""
    return [read_cluster_header(p) for p in find_cluster_files(folder, k, folder_flag, k_flag)]


def parse_distances(values: np.ndarray, path: str, first_row: int = 0) -> np.ndarray:
    """Column 2 strings -> float64, refusing text, NaN and infinity with the row named."""
    try:
        d = to_utf8(values).astype(np.float64)  # numpy parses bytes twice as fast as str
    except (ValueError, UnicodeError):
        d = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            try:
                d[i] = float(v)
            except (ValueError, UnicodeError):
                text = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                raise UsageError(path, f"row {first_row + i}: distance {text!r} is not a number",
                                 "column 2 must hold the distance to the centroid") from None
    bad = np.flatnonzero(~np.isfinite(d))
    if len(bad):
        raise UsageError(path, f"row {first_row + bad[0]}: distance is {d[bad[0]]}",
                         "column 2 must hold finite distances to the centroid")
    return d


def cluster_mean_distance(cluster: ClusterFile) -> tuple[float, bool]:
    """(mean distance to the centroid, whether the file is sorted), streaming the distance column."""
    if cluster.rows == 0:
        return float("nan"), True
    total, previous = 0.0, np.zeros(0)
    ascending = descending = True
    for start, (values,) in cluster.chunks((DIST_COL,)):
        d = parse_distances(values, cluster.path, start)
        steps = np.diff(np.concatenate([previous, d]))  # across chunk borders too
        ascending &= bool((steps >= 0).all())
        descending &= bool((steps <= 0).all())
        total += float(d.sum())
        previous = d[-1:]
    return total / cluster.rows, ascending or descending


def is_descending(cluster: ClusterFile) -> bool:
    """Sort direction of a file from its first and last distance (SemDeDup writes either)."""
    if cluster.rows == 0:
        return True
    (first,) = cluster.columns((DIST_COL,), 0, 1)
    (last,) = cluster.columns((DIST_COL,), cluster.rows - 1, cluster.rows)
    first, last = parse_distances(first, cluster.path)[0], parse_distances(last, cluster.path, cluster.rows - 1)[0]
    return bool(first >= last)


def load_centroids(path: str, k: int | None, dim: int | None, flag: str) -> np.ndarray:
    """k-means centroids, float64 (k, dim), validated and L2-normalised."""
    shape, dtype, _, _ = read_npy_header(path)
    if len(shape) != 2:
        raise UsageError(path, f"has shape {shape}; centroids are a 2-D (k, dim) array",
                         f"point {flag} at SemDeDup's kmeans_centroids.npy")
    if dtype.kind not in "fiu":
        raise UsageError(path, f"has dtype {dtype}; centroids are numbers", f"point {flag} at kmeans_centroids.npy")
    if k is not None and shape[0] != k:
        raise UsageError(path, f"holds {shape[0]} centroids but there are {k} clusters",
                         "use the centroids of the same k-means run")
    if dim is not None and shape[1] != dim:
        raise UsageError("--dim", f"is {dim} but {path} has dimension {shape[1]}",
                         "omit --dim or pass the centroids' dimension")
    c = np.load(path, allow_pickle=False).astype(np.float64)
    if not np.isfinite(c).all():
        raise UsageError(path, f"row {np.argwhere(~np.isfinite(c))[0][0]}: centroid is not finite",
                         "use the centroids of a converged k-means run")
    norms = np.linalg.norm(c, axis=1)
    if (norms == 0).any():
        raise UsageError(path, f"row {np.flatnonzero(norms == 0)[0]}: centroid is all zeros",
                         "a zero centroid has no direction; rerun k-means")
    return c / norms[:, None]


def find_centroids(sorted_dir: str) -> str:
    """kmeans_centroids.npy in the sorted-clusters folder or SemDeDup's save folder above it."""
    here = os.path.join(sorted_dir, CENTROIDS_FILE)
    parent = os.path.join(os.path.dirname(os.path.abspath(sorted_dir)), CENTROIDS_FILE)
    for candidate in (here, parent):
        if os.path.isfile(candidate):
            return candidate
    raise UsageError("--centroids_file", f"not given, and no {CENTROIDS_FILE} in {sorted_dir} or its parent",
                     "pass --centroids_file")


def mean_centroid_distances(centroids: np.ndarray, num_nns: int, threads: int) -> np.ndarray:
    """d_inter: mean cosine distance from each (unit) centroid to its num_nns nearest other centroids."""
    import faiss

    k, dim = centroids.shape
    nns = min(num_nns, k - 1)
    if nns == 0:
        return np.full(k, np.nan, dtype=np.float32)
    faiss.omp_set_num_threads(threads)
    c32 = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(c32)
    sims, ids = index.search(c32, nns + 1)
    # Drop each centroid's own entry; a duplicate centroid may outrank it or push it out.
    is_self = ids == np.arange(k)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), nns)
    keep = np.ones_like(is_self)
    keep[np.arange(k), drop] = False
    others = sims[keep].reshape(k, nns).astype(np.float64)
    return (1.0 - others).mean(axis=1).astype(np.float32)


def load_cluster_scores(path: str, k: int, flag: str) -> np.ndarray:
    """A d_intra or d_inter file: float (k,), NaN allowed (empty clusters), infinity not."""
    shape, dtype, _, _ = read_npy_header(path)
    if dtype.kind != "f":
        raise UsageError(flag, f"{path} has dtype {dtype}; expected floats",
                         "pass the file written by the matching compute_*.py script")
    if shape != (k,):
        raise UsageError(flag, f"{path} has shape {shape} but there are {k} clusters",
                         "recompute it on the same sorted clusters")
    values = np.load(path, allow_pickle=False).astype(np.float64)
    if np.isinf(values).any():
        raise UsageError(flag, f"{path}: entry {np.flatnonzero(np.isinf(values))[0]} is infinite",
                         "recompute it on the same sorted clusters")
    return values


# ---------------------------------------------------------------------------------------------
# The method: complexity, softmax, quotas, selection
# ---------------------------------------------------------------------------------------------


def complexity(density: str, d_intra: np.ndarray | None, d_inter: np.ndarray | None,
               sizes: np.ndarray) -> np.ndarray:
    """The per-cluster score the softmax turns into probabilities (NaN -> nanmean)."""
    if density in ("dintra*dinter", "dinter*dintra"):
        c = d_intra * d_inter
    elif density == "dintra":
        c = d_intra.copy()
    elif density == "dinter":
        c = d_inter.copy()
    elif density == "uniform":
        return np.zeros(len(sizes))
    else:  # clustersize
        return sizes.astype(np.float64)
    nan = np.isnan(c)
    if nan.all():
        log.warning("every cluster's complexity is NaN; using equal complexities")
        return np.zeros(len(c))
    c[nan] = np.nanmean(c)
    return c


def cluster_probabilities(density: str, scores: np.ndarray, temperature: float) -> np.ndarray:
    """P: softmax(C / T), or plain cluster-size proportions for `clustersize` (SSP-Pruning)."""
    if density == "clustersize":
        total = scores.sum()
        return scores / total if total > 0 else np.full(len(scores), 1.0 / len(scores))
    z = scores / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


@dataclass(frozen=True)
class Quotas:
    """The solved quota problem: real solution x, integer quotas, bounds and the water level nu."""

    x: np.ndarray
    quotas: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    nu: float
    min_per_cluster: int


def solve_quotas(probs: np.ndarray, sizes: np.ndarray, target: int, cls_bal_ratio: float) -> Quotas:
    """min ||x - P*N||^2 s.t. sum x = N, lb <= x <= ub, solved exactly, then rounded to integers.

    The problem is separable, so x_j = clip(P_j*N - nu, lb_j, ub_j) for the one nu that makes the
    sum N; nu is found exactly on the piecewise-linear sum. Largest-remainder rounding then keeps
    the sum at N, the bounds, and |N_j - x_j| < 1 (and is the integer optimum of the same QP).
    """
    k = len(sizes)
    upper = np.asarray(sizes, dtype=np.int64)
    m = int(target / k * cls_bal_ratio) if cls_bal_ratio > 0 else 1
    lower = np.maximum(0, np.minimum(m, upper - 1))
    if target > upper.sum():
        raise UsageError("--prune-ratio", f"asks to keep {target} samples but the clusters hold only "
                         f"{upper.sum()}", "lower --prune-ratio or fix --total-dataset-size")
    if lower.sum() > target:
        raise UsageError("--cls-bal-ratio", f"its per-cluster minimum {m} needs {lower.sum()} samples, more "
                         f"than the {target} kept", "lower --cls-bal-ratio or raise --prune-ratio")
    t = np.asarray(probs, dtype=np.float64) * target
    nu = _water_level(t, lower, upper, target)
    x = np.clip(t - nu, lower, upper)
    return Quotas(x, _round_to_sum(x, lower, upper, target), lower, upper, nu, m)


def _water_level(t: np.ndarray, lower: np.ndarray, upper: np.ndarray, target: int) -> float:
    """The nu with sum(clip(t - nu, lower, upper)) == target (the sum falls as nu grows)."""
    def total(nu: float) -> float:
        return float(np.clip(t - nu, lower, upper).sum())

    breaks = np.unique(np.concatenate((t - upper, t - lower)))
    lo, hi = 0, len(breaks) - 1  # total(breaks[lo]) = sum(upper) >= target >= sum(lower) = total(breaks[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(breaks[mid]) >= target:
            lo = mid
        else:
            hi = mid
    if total(breaks[hi]) >= target:
        return float(breaks[hi])
    # On (breaks[lo], breaks[hi]) the sum is linear: free clusters move with nu, the rest sit at a bound.
    mid = (breaks[lo] + breaks[hi]) / 2
    free = (t - upper < mid) & (mid < t - lower)
    fixed = np.where(t - mid >= upper, upper, lower)[~free].sum()
    if not free.any():
        return float(breaks[lo])
    return float((t[free].sum() + fixed - target) / free.sum())


def _round_to_sum(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, target: int) -> np.ndarray:
    """Largest-remainder rounding: floor everything, then +1 for the largest fractions until sum == N."""
    quotas = np.clip(np.floor(x), lower, upper).astype(np.int64)
    short = int(target - quotas.sum())
    order = np.argsort(-(x - quotas), kind="stable")
    order = order[quotas[order] < upper[order]]
    quotas[order[:short]] += 1
    return quotas


def kept_rows(rows: int, quota: int, which: str, descending: bool, seed: int, cluster_id: int) -> slice | np.ndarray:
    """Which rows of a sorted cluster file to keep: a prefix/suffix for hard/easy, a seeded sample for random."""
    if which == "random":
        rng = np.random.default_rng([seed, cluster_id])  # one stream per cluster: any worker count agrees
        return np.sort(rng.choice(rows, size=quota, replace=False))
    far_first = descending  # SemDeDup keep_hard=True sorts the farthest (hardest) first
    take_head = far_first if which == "hard" else not far_first
    return slice(0, quota) if take_head else slice(rows - quota, rows)


def select_cluster(task: tuple[ClusterFile, int, str, int, int]) -> tuple[bytes, np.ndarray, bool]:
    """One cluster's kept paths (as lines of kept_paths.txt) and sorted kept keys, and whether the
    distances read were in the file's order. Reads only the kept rows, and checks their distances."""
    cluster, quota, which, seed, cluster_id = task
    if quota == 0:
        return b"", np.zeros(0, "S1"), True
    descending = which == "random" or is_descending(cluster)
    keep = kept_rows(cluster.rows, quota, which, descending, seed, cluster_id)
    paths, dists = [], []
    if isinstance(keep, slice):  # hard/easy: read only the kept prefix or suffix
        for first, (p, d) in cluster.chunks((PATH_COL, DIST_COL), keep.start, keep.stop):
            paths.append(to_utf8(p))
            dists.append(parse_distances(d, cluster.path, first))
    else:  # random: pick the sampled rows out of each chunk
        bounds = np.searchsorted(keep, np.arange(0, cluster.rows + CHUNK_ROWS, CHUNK_ROWS))
        for i, (first, (p, d)) in enumerate(cluster.chunks((PATH_COL, DIST_COL))):
            picked = keep[bounds[i]:bounds[i + 1]] - first
            paths.append(to_utf8(p[picked]))
            dists.append(parse_distances(d, cluster.path, first)[picked])
    paths, steps = np.concatenate(paths), np.diff(np.concatenate(dists))
    in_order = which == "random" or bool((steps <= 0).all() if descending else (steps >= 0).all())
    return as_lines(paths), np.sort(strip_extensions(paths)), in_order  # sorted here, in parallel


def as_lines(paths: np.ndarray) -> bytes:
    """Fixed-width bytes as newline-terminated lines, without the padding."""
    chars = _byte_matrix(paths)
    lines = np.concatenate([chars, np.full((len(paths), 1), ord("\n"), np.uint8)], axis=1)
    return lines[lines != 0].tobytes()


def select_kept(clusters: list[ClusterFile], quotas: np.ndarray, which: str, seed: int,
                workers: int) -> Iterator[tuple[bytes, np.ndarray, bool]]:
    """Per cluster, in order, the kept paths and keys, whether its distances were in order, from workers."""
    tasks = [(cluster, int(quota), which, seed, j) for j, (cluster, quota) in enumerate(zip(clusters, quotas))]
    return parallel_map(select_cluster, tasks, workers, "select")


class KeptKeyCollector:
    """The kept keys of all clusters, gathered into one array allocated once (no list of parts to
    concatenate: memory stays near the keys' own size), then sorted and de-duplicated."""

    def __init__(self, capacity: int):
        self.keys, self.count = np.zeros(capacity, "S1"), 0

    def add(self, part: np.ndarray) -> None:
        if part.dtype.itemsize > self.keys.dtype.itemsize:  # a longer key than any so far: widen
            self.keys = self.keys.astype(part.dtype)
        self.keys[self.count:self.count + len(part)] = part
        self.count += len(part)

    def sorted_unique(self) -> np.ndarray:
        """kept_keys.npy: sorted, each key once."""
        keys = self.keys[:self.count]
        keys.sort(kind="stable")  # in place; timsort merges the per-cluster sorted runs
        repeats = keys[1:] == keys[:-1]
        return keys[np.concatenate(([True], ~repeats))] if repeats.any() else keys


# ---------------------------------------------------------------------------------------------
# Keys: the rules shared by the trie, kept_keys.npy and the loader filter
# ---------------------------------------------------------------------------------------------


def _byte_matrix(strings: np.ndarray) -> np.ndarray:
    """A fixed-width bytes array as an (n, width) uint8 matrix, zero-padded on the right."""
    return np.ascontiguousarray(strings).view(np.uint8).reshape(len(strings), strings.dtype.itemsize)


def to_utf8(paths: np.ndarray) -> np.ndarray:
    """A str or bytes array of paths as UTF-8 bytes ('S' dtype)."""
    if paths.dtype.kind == "S":
        return np.ascontiguousarray(paths)
    width = max(1, paths.dtype.itemsize // 4)
    points = np.ascontiguousarray(paths).view("<u4")
    if (points < 128).all():  # ASCII, the usual case: narrow the code points (numpy's cast is slower)
        return points.astype(np.uint8).view(f"S{width}").reshape(paths.shape)
    return np.strings.encode(paths, "utf-8")


def strip_extensions(keys: np.ndarray) -> np.ndarray:
    """Remove the extension of each path's last component, like posixpath.splitext, vectorised.

    `00012/000120034.jpg` -> `00012/000120034`; `a.b/c` and `.hidden` stay as they are.
    """
    n, width = len(keys), keys.dtype.itemsize
    if n == 0:
        return keys.copy()
    chars = _byte_matrix(keys)
    last_slash = _last_index(chars == ord("/"))
    last_dot = _last_index(chars == ord("."))
    cut = np.where(last_dot > last_slash, last_dot, width)
    # splitext skips the leading dots of the last component (`.hidden`, `..x.y`): decide those rare
    # names one by one; for the rest, a dot after the last slash starts the extension.
    odd = np.flatnonzero((cut < width) & (chars[np.arange(n), np.minimum(last_slash + 1, width - 1)] == ord(".")))
    for i in odd:
        cut[i] = len(posixpath.splitext(chars[i].tobytes().rstrip(b"\0"))[0])
    cut = np.minimum(cut, (chars != 0).sum(axis=1))  # the key's length
    narrow = max(1, int(cut.max()))  # no wider than the longest key: less to sort, store and send
    return np.ascontiguousarray((chars * (np.arange(width) < cut[:, None]))[:, :narrow]).view(f"S{narrow}").ravel()


def _last_index(hits: np.ndarray) -> np.ndarray:
    """Per row, the column of the last True, or -1."""
    last = hits.shape[1] - 1 - hits[:, ::-1].argmax(axis=1)
    return np.where(hits.any(axis=1), last, -1)


def strip_extension(path: str) -> str:
    """The key of one path (the scalar twin of strip_extensions)."""
    return strip_extensions(np.array([path.encode("utf-8")]))[0].decode("utf-8")


def trie_order(keys: np.ndarray) -> np.ndarray:
    """Sorted unique keys (bytes) reordered by their '/'-separated components: the trie's insertion order."""
    if len(keys) < 2:
        return keys
    # Component order is byte order with '/' mapped below every other byte (0x01 must then be free).
    # Sorted keys are usually in it already (equal-width shard names): check that block by block.
    def mapped(block: np.ndarray) -> np.ndarray:
        chars = _byte_matrix(block)
        return np.where(chars == ord(TRIE_SEPARATOR), np.uint8(1), chars).view(keys.dtype).ravel()

    if any((_byte_matrix(keys[i:i + TRIE_CHUNK_KEYS]) == 1).any() for i in range(0, len(keys), TRIE_CHUNK_KEYS)):
        return np.array(sorted(keys.tolist(), key=lambda k: k.split(b"/")), dtype=keys.dtype)
    previous = np.zeros(0, keys.dtype)
    for start in range(0, len(keys), TRIE_CHUNK_KEYS):
        block = np.concatenate([previous, mapped(keys[start:start + TRIE_CHUNK_KEYS])])
        if not (block[1:] >= block[:-1]).all():
            return keys[np.argsort(mapped(keys), kind="stable")]
        previous = block[-1:]
    return keys


# The trie pickle is written as CPython's C pickler would write pygtrie's own pickle of the trie,
# without building the trie: a StringTrie pickles its root node as a flat list of commands,
# `n, step_1..step_n, value` (walk n steps down, set a value) and `-n` (walk n steps up), which
# keys in component order give in one pass. The list items are encoded with numpy; the rest of
# the file comes from pickling an empty trie. CPython's rules followed here: list items go in
# batches of 1000 between MARK and APPENDS; every new str is memoised, and the 1-character
# latin-1 strings and '' are interned objects, so their repeats are memo GETs; a 64 KiB frame is
# closed at the first end of a save() past its size. tests/test_keys.py checks the bytes.
FRAME_TARGET = 64 * 1024
FRAME_MIN = 4  # shorter frames get no FRAME header
LIST_BATCH = 1000
TRIE_CHUNK_KEYS = 1 << 14  # keys encoded at a time: arrays stay in cache, memory stays flat
OP = {name: ord(code) for name, code in dict(
    MARK="(", APPENDS="e", BININT="J", BININT1="K", SHORT_BINUNICODE="\x8c", BINUNICODE="X",
    MEMOIZE="\x94", BINGET="h", LONG_BINGET="j", FRAME="\x95").items()}


def write_trie(f, keys: np.ndarray) -> None:
    """Pickle a pygtrie.StringTrie of the sorted unique `keys` (bytes, value 1 each): byte-identical
    to pickle.dump(trie, f, protocol=4) of the trie built key by key in `trie_order`."""
    proto, head, head_memos, tail, tail_ends = _empty_trie_pickle()
    for i in range(0, len(keys), TRIE_CHUNK_KEYS):  # no str key can hold bytes that are not UTF-8
        chunk = keys[i:i + TRIE_CHUNK_KEYS]
        try:
            if (_byte_matrix(chunk) >= 128).any():
                np.strings.decode(chunk, "utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(KEPT_KEYS_FILE, f"a kept key is not UTF-8 ({e})", "fix the paths") from None
    f.write(proto)
    frames = _Framer(f)
    frames.feed(np.frombuffer(head, np.uint8), np.zeros(0, np.int64))
    state = {"items": 0, "memo": head_memos, "interned": {}, "previous": None}
    ordered = trie_order(keys)
    for first in range(0, len(ordered), TRIE_CHUNK_KEYS):
        frames.feed(*_encode_trie_items(ordered[first:first + TRIE_CHUNK_KEYS], state))
    # The list's save() ends after its last APPENDS; then the rest of the trie's pickle.
    close = b"e" if state["items"] % LIST_BATCH else b""
    frames.feed(np.frombuffer(close + tail, np.uint8), np.array([len(close)] + [len(close) + e for e in tail_ends]))
    frames.close()


class _Framer:
    """CPython's protocol-4 framing of an opcode stream fed with the offsets where a save() ends."""

    def __init__(self, f):
        self.f, self.pending = f, np.zeros(0, np.uint8)

    def feed(self, data: np.ndarray, save_ends: np.ndarray) -> None:
        ends = len(self.pending) + save_ends
        self.pending = np.concatenate([self.pending, data])
        start = 0
        while (i := np.searchsorted(ends, start + FRAME_TARGET)) < len(ends):
            self._write(self.pending[start:ends[i]])
            start = ends[i]
        self.pending = self.pending[start:]

    def close(self) -> None:
        self._write(self.pending)

    def _write(self, frame: np.ndarray) -> None:
        if len(frame) >= FRAME_MIN:
            self.f.write(bytes([OP["FRAME"]]) + len(frame).to_bytes(8, "little"))
        self.f.write(frame.tobytes())


def _empty_trie_pickle() -> tuple[bytes, bytes, int, bytes, list[int]]:
    """PROTO; the opcodes up to the root's empty command list and how many memo entries they make;
    the opcodes after it and where saves end among them."""
    import pickletools

    data = pickle.dumps(pygtrie.StringTrie(separator=TRIE_SEPARATOR), protocol=PICKLE_PROTOCOL)
    ops = list(pickletools.genops(data))
    body = ops[1][2] + 9  # PROTO, then one FRAME opcode with its 8-byte length
    split = next(pos for op, _, pos in ops if op.name == "EMPTY_LIST") + 2  # EMPTY_LIST MEMOIZE
    # In the tail every opcode ends a save() but a string's (its MEMOIZE does) and STOP.
    ends = [ops[i + 1][2] - split for i in range(len(ops) - 1)
            if ops[i][2] >= split and "UNICODE" not in ops[i][0].name and ops[i][0].name != "STOP"]
    memos = sum(op.name == "MEMOIZE" for op, _, pos in ops if pos < split)
    return data[:ops[1][2]], data[body:split], memos, data[split:], ends


def _split_levels(keys: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The '/'-separated components of each key: per level a zero-padded byte matrix and lengths."""
    rest = _byte_matrix(keys)
    n, width = rest.shape
    rest_len = (rest != 0).sum(axis=1)
    depth = (rest == ord(TRIE_SEPARATOR)).sum(axis=1) + 1
    cols = np.arange(width)
    levels, lengths = [], []
    for level in range(int(depth.max()) if n else 0):
        more = level < depth - 1
        cut = np.where(more, (rest == ord(TRIE_SEPARATOR)).argmax(axis=1), rest_len)
        levels.append(rest * (cols < cut[:, None]))
        lengths.append(cut)
        shifted = np.zeros_like(rest)
        for at in np.flatnonzero(np.bincount(cut[more])):  # few distinct widths (shard names): a block copy each
            rows = more & (cut == at)
            shifted[rows, : width - at - 1] = rest[rows, at + 1:]
        rest, rest_len = shifted, np.where(more, rest_len - cut - 1, 0)
    return levels, lengths, depth


def _encode_trie_items(chunk: np.ndarray, state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Opcodes of the command-list items of a chunk of ordered keys, and where each item's save() ends."""
    prev = state["previous"]
    keys = chunk if prev is None else np.concatenate([prev, chunk])
    levels, lengths, depth = _split_levels(keys)
    common = np.zeros(len(keys), np.int64)  # leading components shared with the previous key
    same = np.ones(len(keys) - 1, bool)
    for level, chars in enumerate(levels):
        as_str = chars.view(f"S{chars.shape[1]}").ravel()
        same &= (level < depth[1:]) & (level < depth[:-1]) & (as_str[1:] == as_str[:-1])
        common[1:] += same
    up = np.concatenate([[0], depth[:-1] - common[1:]])
    if prev is not None:  # the predecessor only set `common` for the chunk's first key
        levels, lengths = [m[1:] for m in levels], [x[1:] for x in lengths]
        up, common, depth = up[1:], common[1:], depth[1:]
    state["previous"] = chunk[-1:]
    n, n_levels = len(chunk), len(levels)

    # Items per key: [-up], down, its new components (levels common..depth-1), the value 1.
    level = np.arange(n_levels)
    new_part = (common[:, None] <= level) & (level < depth[:, None])
    length = np.stack(lengths, axis=1)
    c0 = np.stack([m[:, 0] for m in levels], axis=1).astype(np.int64)
    c1 = np.stack([m[:, 1] if m.shape[1] > 1 else np.zeros(n, np.uint8) for m in levels], axis=1).astype(np.int64)
    memo, get = np.zeros((n, n_levels), np.int64), np.zeros((n, n_levels), bool)
    memo[new_part], get[new_part] = _memo_indices(length[new_part], c0[new_part], c1[new_part], state)
    head = np.where(length < 256, 2, 5)  # SHORT_BINUNICODE len | BINUNICODE len4
    str_size = np.where(new_part, np.where(get, np.where(memo < 256, 2, 5), head + length + 1), 0)
    size = np.column_stack([np.where(up > 0, 5, 0), np.full(n, 2), str_size, np.full(n, 2)])

    # One record per key in a fixed-slot byte matrix; `valid` marks the bytes really written.
    slots = [5, 2] + [int(head[:, i].max()) + m.shape[1] + 1 for i, m in enumerate(levels)] + [2]
    at = np.cumsum(slots) - slots
    rec = np.zeros((n, at[-1] + 2), np.uint8)
    rec[:, 0] = OP["BININT"]
    rec[:, 1:5] = (-up).astype("<i4").view(np.uint8).reshape(n, 4)
    rec[:, 5] = OP["BININT1"]
    rec[:, 6] = depth - common
    for i, chars in enumerate(levels):
        o, rows = at[2 + i], np.arange(n)
        for short in (True, False):
            r = rows[new_part[:, i] & ~get[:, i] & ((length[:, i] < 256) == short)]
            data = o + (2 if short else 5)
            rec[r, o] = OP["SHORT_BINUNICODE"] if short else OP["BINUNICODE"]
            rec[r, o + 1:data] = length[r, i].astype("<u4").view(np.uint8).reshape(-1, 4)[:, : data - o - 1]
            rec[r, data:data + chars.shape[1]] = chars[r]
            rec[r, data + length[r, i]] = OP["MEMOIZE"]
            r = rows[get[:, i] & ((memo[:, i] < 256) == short)]
            rec[r, o] = OP["BINGET"] if short else OP["LONG_BINGET"]
            rec[r, o + 1:o + (2 if short else 5)] = memo[r, i].astype("<u4").view(np.uint8).reshape(-1, 4)[
                :, : 1 if short else 4]
    rec[:, -2:] = (OP["BININT1"], TRIE_VALUE)
    valid = np.ones(rec.shape, bool)
    valid[:, :5] = (up > 0)[:, None]
    for i in range(n_levels):
        valid[:, at[2 + i]:at[3 + i]] = np.arange(slots[2 + i]) < str_size[:, i, None]
    out = rec[valid]

    # Item ends in `out`, then MARK before every 1000th item of the list and APPENDS after each full batch.
    item_size = size[size > 0]
    ends = np.cumsum(item_size)
    total = len(item_size)
    opens = np.arange(-state["items"] % LIST_BATCH, total, LIST_BATCH)
    closes = np.arange((LIST_BATCH - 1 - state["items"]) % LIST_BATCH, total, LIST_BATCH)
    where = np.concatenate([ends[closes], ends[opens] - item_size[opens]])  # at a tie, APPENDS goes first
    marks = np.concatenate([np.full(len(closes), OP["APPENDS"]), np.full(len(opens), OP["MARK"])]).astype(np.uint8)
    order = np.argsort(where, kind="stable")
    out = np.insert(out, where[order], marks[order])
    # Marks before an item's end: the MARKs up to and including its own, the APPENDS before it.
    g, g0 = state["items"] + np.arange(total), state["items"]
    shift = (g // LIST_BATCH - (g0 - 1) // LIST_BATCH) + (g // LIST_BATCH - g0 // LIST_BATCH)
    state["items"] += total
    return out, ends + shift


def _memo_indices(length: np.ndarray, c0: np.ndarray, c1: np.ndarray, state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per component string (given its UTF-8 length and first two bytes): its memo index, and whether
    it repeats an interned string, which pickles as a GET of its first memo entry."""
    # CPython interns '' and the 1-character strings of code points below 256.
    two = (length == 2) & ((c0 == 0xC2) | (c0 == 0xC3))
    interned = (length == 0) | ((length == 1) & (c0 < 0x80)) | two
    code = np.where(length == 0, -1, np.where(two, ((c0 & 0x1F) << 6) | (c1 & 0x3F), c0))
    seen = state["interned"]  # code -> memo index, across chunks
    is_get = np.zeros(len(length), bool)
    if interned.any():
        at = np.flatnonzero(interned)
        _, first_seen = np.unique(code[at], return_index=True)
        repeat = np.isin(code[at], list(seen))
        repeat[np.setdiff1d(np.arange(len(at)), first_seen)] = True
        is_get[at] = repeat
    memo = state["memo"] + np.cumsum(~is_get) - 1
    for i in np.flatnonzero(interned & ~is_get):
        seen[int(code[i])] = int(memo[i])
    if is_get.any():
        table = np.zeros(257, np.int64)
        table[np.array(list(seen)) + 1] = list(seen.values())
        memo = np.where(is_get, table[code + 1], memo)
    state["memo"] += int((~is_get).sum())
    return memo, is_get


# ---------------------------------------------------------------------------------------------
# Output: atomic files and the save-dir protocol
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
    """Write to `.<name>.partial` beside `path`, renamed into place only once complete."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if not path:
        raise UsageError(flag, "is required", "pass the .npy file to write")
    if os.path.isdir(path):
        raise UsageError(flag, f"{path} is a folder", "pass a file path such as out/dintra.npy")
    _check_creatable(os.path.dirname(os.path.abspath(path)), flag)


def _check_creatable(folder: str, flag: str) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is a writable folder."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(flag, f"{probe} is a file, so {folder} cannot be created", "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(flag, f"{probe} is not writable", "choose a path you can write to")


def save_npy(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        np.save(f, array)


class SaveDir:
    """prune.py's --save-dir. `with SaveDir(path, overwrite) as out:` writes every output into a hidden
    staging folder (`out.path(name)`) and, when the block succeeds, moves them into place with
    params.json last, the mark of a completed run. A failed or killed run leaves the outputs the
    folder had untouched (a folder it created goes again); a rerun finishes a killed one."""

    def __init__(self, path: str | None, overwrite: bool):
        if not path:
            raise UsageError("--save-dir", "is required", "pass the folder for the outputs")
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError("--save-dir", f"{path} is a file", "pass a folder")
        _check_creatable(os.path.abspath(path), "--save-dir")
        if os.path.exists(os.path.join(path, PARAMS_FILE)) and not overwrite:
            raise UsageError("--save-dir", f"{path} already holds the outputs of a completed run",
                             "pass --overwrite to replace them, or choose another --save-dir")
        self.dir, self.staging = path, os.path.join(path, STAGING_DIR)

    def path(self, name: str) -> str:
        return os.path.join(self.staging, name)

    def __enter__(self) -> SaveDir:
        self.created, self.touched = None, os.path.abspath(self.dir)  # the top folder this run makes
        while not os.path.exists(self.touched):
            self.created, self.touched = self.touched, os.path.dirname(self.touched)
        self.times = os.stat(self.touched)
        os.makedirs(self.dir, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left
        os.mkdir(self.staging)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            if self.created:
                shutil.rmtree(self.created, ignore_errors=True)
            with contextlib.suppress(OSError):  # as it was, down to the folder's timestamps
                os.utime(self.touched, ns=(self.times.st_atime_ns, self.times.st_mtime_ns))
            return
        written = set(os.listdir(self.staging))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.dir, PARAMS_FILE))  # incomplete from here until the end
        for name in OUTPUT_FILES:
            if name in written and name != PARAMS_FILE:
                os.replace(self.path(name), os.path.join(self.dir, name))
            elif name not in written:  # an earlier run's output this one does not make (--no-trie)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.dir, name))
        os.replace(self.path(PARAMS_FILE), os.path.join(self.dir, PARAMS_FILE))
        shutil.rmtree(self.staging)


def write_cluster_stats(f, table: dict[str, np.ndarray]) -> None:
    import pandas as pd

    pd.DataFrame(table).to_csv(f, index=False, na_rep="nan")


def plot_quotas(f, probs: np.ndarray, quotas: np.ndarray, target: int, title: str) -> None:
    """N_j and the softmax target P*N per cluster, clusters sorted by P."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a faster import

    order = np.argsort(probs, kind="stable")
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.scatter(np.arange(len(order)), quotas[order], s=6, label="quota $N_j$ (kept)")
    ax.plot(np.arange(len(order)), probs[order] * target, color="tab:orange", label="softmax target $P_j N$")
    ax.set_xlabel("clusters, sorted by $P_j$")
    ax.set_ylabel("samples kept per cluster")
    ax.set_title(title)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    fig.savefig(f, format="png")


def write_report(out: SaveDir, table: dict[str, np.ndarray], probs: np.ndarray, quotas: np.ndarray,
                 target: int, title: str) -> None:
    """cluster_stats.csv and quotas.png: they need only the quotas, so they are written beside the trie."""
    with open(out.path(STATS_FILE), "wb") as f:
        write_cluster_stats(f, table)
    with open(out.path(PLOT_FILE), "wb") as f:
        plot_quotas(f, probs, quotas, target, title)


def write_params(f, params: dict[str, Any]) -> None:
    f.write((json.dumps(params, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Loader side: the trie, the compact key set and the webdataset filter
# ---------------------------------------------------------------------------------------------


def load_trie(path: str) -> pygtrie.StringTrie:
    """The kept-key trie written by prune.py (a pickle: load only files you made)."""
    with open(path, "rb") as f:
        trie = pickle.load(f)
    if not isinstance(trie, pygtrie.StringTrie):
        raise UsageError(path, f"holds a {type(trie).__name__}, not a pygtrie.StringTrie",
                         f"pass the {TRIE_FILE} written by prune.py")
    return trie


def trie_search(trie: pygtrie.StringTrie, key: str) -> bool:
    """True if `key` (a path without its extension) was kept."""
    return trie.has_key(key)


class KeptKeys:
    """kept_keys.npy, memory-mapped: sorted UTF-8 keys, membership by binary search.

    The map is shared by every loader worker through the page cache; pickling (for spawned
    workers) sends the path, not the keys.
    """

    def __init__(self, path: str):
        self.path = path
        shape, dtype, _, _ = read_npy_header(path)
        if dtype.kind != "S" or len(shape) != 1:
            raise UsageError(path, f"has dtype {dtype} and shape {shape}; expected 1-D bytes",
                             f"pass the {KEPT_KEYS_FILE} written by prune.py")
        self.keys = np.load(path, mmap_mode="r") if shape[0] else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        b = key.encode("utf-8")
        if len(b) > self.keys.dtype.itemsize:  # numpy would truncate it and could match a prefix
            return False
        i = int(np.searchsorted(self.keys, b))
        return i < len(self.keys) and self.keys[i] == b

    def __reduce__(self):
        return KeptKeys, (self.path,)


def load_kept_keys(path: str) -> KeptKeys:
    return KeptKeys(path)


def _key_set(source: Any) -> Any:
    """A trie, a KeptKeys, or a path to either, as something that answers `key in keys`."""
    if isinstance(source, (pygtrie.StringTrie, KeptKeys)):
        return source
    path = os.fspath(source)
    with open(path, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    return load_kept_keys(path) if is_npy else load_trie(path)


def shard_stem(url: str) -> str:
    """`.../00012.tar` -> `00012`: the shard part of a `<shard>/<key>` key."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class WebdatasetFilter:
    """`sample -> bool` for `webdataset.WebDataset(urls).select(...)`; picklable for loader workers."""

    def __init__(self, keys: Any, with_shard: bool):
        self.keys, self.with_shard = keys, with_shard

    def __call__(self, sample: dict) -> bool:
        key = sample["__key__"]
        if self.with_shard:
            key = f"{shard_stem(sample['__url__'])}/{key}"
        return key in self.keys


def webdataset_filter(trie_or_path: Any, with_shard: bool = True) -> WebdatasetFilter:
    """Keep the samples whose key was kept: `<shard stem>/<__key__>`, or `__key__` alone."""
    return WebdatasetFilter(_key_set(trie_or_path), with_shard)
