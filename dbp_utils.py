"""Density-Based Pruning (DBP): the method, and the loader API for the samples it keeps.

Read top to bottom, this is the paper's pipeline after k-means: d_intra and d_inter per cluster,
the complexity C = d_intra * d_inter, the softmax over clusters, the exact quota solver, and the
selection of each cluster's kept members; then the kept keys (the trie, kept_keys.npy) and what a
data loader uses to filter a webdataset with them (`load_trie`, `trie_search`, `load_kept_keys`,
`webdataset_filter`); then prune.py's report. Reading the cluster files lives in dbp_clusters.py,
the command-line and process plumbing in dbp_cli.py.

faiss and matplotlib are imported inside the functions that need them, so the scripts
start fast in shell pipelines and a data loader importing this module stays light.
"""

from __future__ import annotations

import csv
import itertools
import os
import pickle
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pygtrie

from dbp_cli import UsageError, __version__, log  # noqa: F401 (__version__: for users)
from dbp_clusters import (
    CHUNK_ROWS,
    ClusterFile,
    byte_matrix,
    keys_as_utf8,
    names_cluster,
    parse_distances,
    read_npy_header,
)
from dbp_tasks import TaskPool

DENSITIES = ("dintra*dinter", "dinter*dintra", "dintra", "dinter", "uniform", "clustersize")
WHICH_TO_KEEP = ("hard", "easy", "random")
FAISS_NO_BLAS = 1 << 30  # query batches at least this large go to BLAS: never

# prune.py's outputs; params.json is written last and marks a run as complete.
TRIE_FILE = "kept_keys_trie.pkl"
KEPT_KEYS_FILE = "kept_keys.npy"
KEPT_PATHS_FILE = "kept_paths.txt"
PRUNED_PATHS_FILE = "pruned_paths.txt"  # with --pruned-paths
QUOTAS_FILE = "quotas.npy"
STATS_FILE = "cluster_stats.csv"
PLOT_FILE = "quotas.png"
LOG_FILE = "logs.log"
PARAMS_FILE = "params.json"
DATACOMP_FILE = "datacomp_subset.npy"  # with --datacomp-subset
OUTPUT_FILES = (KEPT_PATHS_FILE, PRUNED_PATHS_FILE, KEPT_KEYS_FILE, TRIE_FILE, DATACOMP_FILE, QUOTAS_FILE, STATS_FILE,
                PLOT_FILE, LOG_FILE, PARAMS_FILE)
DATACOMP_UID = np.dtype("u8,u8")  # a DataComp uid, 32 hex digits, as its (high, low) 64-bit halves

TRIE_SEPARATOR = "/"
TRIE_VALUE = 1
PICKLE_PROTOCOL = 4
TRIE_CHUNK_KEYS = 1 << 14  # keys turned into trie commands at a time
# What unpickling a pygtrie trie calls, and all load_trie allows: the trie classes and the node (any pygtrie
# version the package allows), the list our writer streams, and protocols 0-1's way of making an object
# (which name the modules as Python 2 did).
TRIE_GLOBALS = {("pygtrie", "StringTrie"), ("pygtrie", "CharTrie"), ("pygtrie", "Trie"), ("pygtrie", "_Node"),
                *((b, name) for b in ("builtins", "__builtin__") for name in ("list", "object")),
                ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")}
SCAN_KEYS = 1 << 18  # kept keys looked at a block at a time for their form
SHARD_EXTENSIONS = (".tar.gz", ".tgz", ".tar")  # webdataset shards; the file name without it is the shard
HEX_DIGITS = b"0123456789abcdef"


# ---------------------------------------------------------------------------------------------
# d_intra and d_inter
# ---------------------------------------------------------------------------------------------


def cluster_mean_distance(cluster: ClusterFile) -> tuple[float, bool]:
    """d_intra of one cluster, the mean distance to its centroid, and whether its file is sorted."""
    if cluster.rows == 0:
        return float("nan"), True
    mean, previous = 0.0, np.zeros(0)
    ascending = descending = True
    for start, (values,) in cluster.chunks(("distance",)):
        d = parse_distances(values, cluster.path, start)
        steps = np.diff(np.concatenate([previous, d]))  # across chunk borders too
        ascending &= bool((steps >= 0).all())
        descending &= bool((steps <= 0).all())
        mean += float((d / cluster.rows).sum())  # a sum of huge distances could overflow; the mean cannot
        previous = d[-1:]
    if abs(mean) > float(np.finfo(np.float32).max):
        raise UsageError(cluster.path, f"the mean distance {mean:g} is too large for d_intra's float32",
                         "the distance column must hold distances to the centroid (cosine or L2)")
    return mean, ascending or descending


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, without overflow or underflow for any finite, non-zero row."""
    x = x / np.abs(x).max(axis=1, keepdims=True)  # the largest entry becomes 1: the norm is in [1, sqrt(dim)]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mean_centroid_distances(centroids: np.ndarray, num_nns: int, threads: int) -> np.ndarray:
    """d_inter: mean cosine distance from each centroid to its num_nns nearest other centroids. A NaN row
    (the centroid of an empty cluster that no member defines) has NaN and is no one's neighbour."""
    defined = ~np.isnan(centroids).any(axis=1)
    if not defined.all():
        d_inter = np.full(len(centroids), np.nan, dtype=np.float32)
        d_inter[defined] = mean_centroid_distances(centroids[defined], num_nns, threads)
        return d_inter
    k, dim = centroids.shape
    nns = min(num_nns, k - 1)
    if nns == 0:
        return np.full(k, np.nan, dtype=np.float32)
    faiss = exact_faiss(threads)
    unit = np.ascontiguousarray(unit_rows(centroids), dtype=np.float32)  # inner product = cosine
    index = faiss.IndexFlatIP(dim)
    index.add(unit)
    sims, ids = index.search(unit, nns + 1)
    # Drop each centroid's own entry; a duplicate centroid may outrank it or push it out.
    is_self = ids == np.arange(k)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), nns)
    keep = np.ones_like(is_self)
    keep[np.arange(k), drop] = False
    others = sims[keep].reshape(k, nns).astype(np.float64)
    return (1.0 - others).mean(axis=1).astype(np.float32)


def exact_faiss(threads: int) -> Any:
    """faiss, on `threads` threads, computing every inner product and distance the same way for any number of
    them: past a batch of 20 queries faiss hands them to BLAS, whose sums split differently by thread count
    (the last digits of a distance, and so near ties, would depend on --workers); its own SIMD loop per
    query does not, and is as fast at the dimensions of image embeddings (measured: 0.9x-1.3x BLAS's time)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = FAISS_NO_BLAS
    return faiss


# ---------------------------------------------------------------------------------------------
# The method: complexity, softmax, quotas
# ---------------------------------------------------------------------------------------------


def complexity(density: str, d_intra: np.ndarray | None, d_inter: np.ndarray | None,
               sizes: np.ndarray) -> np.ndarray:
    """The per-cluster score the softmax turns into probabilities (NaN -> nanmean)."""
    if density in ("dintra*dinter", "dinter*dintra"):
        with np.errstate(over="ignore"):  # checked below
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
    if not np.isfinite(c).all():
        raise UsageError("--density", f"{density} overflows: d_intra and d_inter are too large to multiply",
                         "recompute d_intra and d_inter from the cluster files")
    return c


def cluster_probabilities(density: str, scores: np.ndarray, temperature: float) -> np.ndarray:
    """P: softmax(C / T), or plain cluster-size proportions for `clustersize` (SSP-Pruning)."""
    if density == "clustersize":
        total = scores.sum()
        return scores / total if total > 0 else np.full(len(scores), 1.0 / len(scores))
    e = np.exp((scores - scores.max()) / temperature)  # exponents <= 0: no overflow for any T > 0
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


# ---------------------------------------------------------------------------------------------
# The method: selection inside each cluster
# ---------------------------------------------------------------------------------------------


def kept_rows(rows: int, quota: int, which: str, descending: bool, seed: int, cluster_id: int) -> slice | np.ndarray:
    """Which rows of a sorted cluster file to keep: a prefix/suffix for hard/easy, a seeded sample for random."""
    if which == "random":
        rng = np.random.default_rng([seed, cluster_id])  # one stream per cluster: any worker count agrees
        return np.sort(rng.choice(rows, size=quota, replace=False))
    far_first = descending  # SemDeDup keep_hard=True sorts the farthest (hardest) first
    take_head = far_first if which == "hard" else not far_first
    return slice(0, quota) if take_head else slice(rows - quota, rows)


@dataclass(frozen=True)
class Selection:
    """What one cluster's selection task noticed; what it kept is in its part file (take_part reads it)."""

    kept: int
    in_order: bool = True  # the distances read follow the file's sort order
    ids_match: bool = True  # the cluster-id column names this cluster


def part_file(parts: str, cluster_id: int, pruned: bool = False) -> str:
    """Where a selection task leaves one cluster's kept keys and paths (or, `pruned`, its pruned paths)."""
    return os.path.join(parts, f"{'pruned' if pruned else 'kept'}_{cluster_id}")


def select_cluster(task: tuple[ClusterFile, int, str, int, int, bool, str]) -> Selection:
    """Select the kept members of one cluster and write them (and, if asked, the pruned ones) to its part
    files in `parts`. Reads only the kept rows, and checks their distances."""
    cluster, quota, which, seed, cluster_id, with_pruned, parts = task
    descending = which == "random" or quota == 0 or cluster.is_descending()  # no rows read for nothing kept
    keep = kept_rows(cluster.rows, quota, which, descending, seed, cluster_id)
    if with_pruned:
        with open(part_file(parts, cluster_id, pruned=True), "wb") as f:
            f.write(as_lines(pruned_paths(cluster, keep)))
    paths, dists, ids_match = [np.zeros(0, "S1")], [np.zeros(0)], True
    columns = ("key", "distance", "cluster")
    if isinstance(keep, slice):  # hard/easy: read only the kept prefix or suffix
        for first, (p, d, ids) in cluster.chunks(columns, keep.start, keep.stop):
            paths.append(keys_as_utf8(p, cluster.path, first))
            dists.append(parse_distances(d, cluster.path, first))
            ids_match &= names_cluster(ids, cluster_id)
    else:  # random: pick the sampled rows out of each chunk
        bounds = np.searchsorted(keep, np.arange(0, cluster.rows + CHUNK_ROWS, CHUNK_ROWS))
        for i, (first, (p, d, ids)) in enumerate(cluster.chunks(columns)):
            picked = keep[bounds[i]:bounds[i + 1]] - first
            paths.append(keys_as_utf8(p, cluster.path, first)[picked])
            dists.append(parse_distances(d, cluster.path, first)[picked])
            ids_match &= names_cluster(ids[picked], cluster_id)
    paths, steps = np.concatenate(paths), np.diff(np.concatenate(dists))
    in_order = which == "random" or bool((steps <= 0).all() if descending else (steps >= 0).all())
    with open(part_file(parts, cluster_id), "wb") as f:  # one file: fewer to open and remove at web scale
        np.save(f, np.sort(strip_extensions(paths)))  # the keys, sorted here, in parallel
        f.write(as_lines(paths))  # then the lines of kept_paths.txt
    return Selection(len(paths), in_order, ids_match)


def pruned_paths(cluster: ClusterFile, keep: slice | np.ndarray) -> np.ndarray:
    """The paths of the rows a cluster does not keep (`keep`, from kept_rows), in file order (UTF-8 bytes)."""
    if cluster.rows == 0:
        return np.zeros(0, "S1")
    kept = np.zeros(cluster.rows, bool)
    kept[keep] = True
    return np.concatenate([keys_as_utf8(p, cluster.path, first)[~kept[first:first + len(p)]]
                           for first, (p,) in cluster.chunks(("key",))])


def select_kept(clusters: list[ClusterFile], quotas: np.ndarray, which: str, seed: int, with_pruned: bool,
                parts: str, pool: TaskPool) -> Iterator[Selection]:
    """Per cluster, in order, its Selection; its part files are in `parts` when it comes."""
    tasks = [(cluster, int(n), which, seed, j, with_pruned, parts)
             for j, (cluster, n) in enumerate(zip(clusters, quotas))]
    return pool.run(select_cluster, tasks, "select")


def take_part(path: str, lines_to: Any, with_keys: bool = True) -> np.ndarray | None:
    """A part file a task left, removed once read: its keys (a .npy at its start) returned, the lines after them
    appended to the open file `lines_to`."""
    with open(path, "rb") as f:
        keys = np.load(f) if with_keys else None
        _append(f, lines_to)
    os.remove(path)
    return keys


def _append(source: Any, out: Any) -> None:
    """The rest of the open file `source` appended to the open file `out`, copied by the kernel."""
    out.flush()
    start, size = source.tell(), os.fstat(source.fileno()).st_size
    while start < size:
        start += os.copy_file_range(source.fileno(), out.fileno(), size - start, start)


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
# Keys: a sample's path without its extension, as the trie, kept_keys.npy and the filter hold it
# ---------------------------------------------------------------------------------------------


def as_lines(paths: np.ndarray) -> bytes:
    """Fixed-width bytes as newline-terminated lines, without the padding."""
    chars = byte_matrix(paths)
    lines = np.concatenate([chars, np.full((len(paths), 1), ord("\n"), np.uint8)], axis=1)
    return lines[lines != 0].tobytes()


def strip_extensions(keys: np.ndarray) -> np.ndarray:
    """Remove the extension of each path's last component, like posixpath.splitext, vectorised.

    `00012/000120034.jpg` -> `00012/000120034`; `a.b/c` and `.hidden` stay as they are.
    """
    if len(keys) == 0:
        return keys.copy()
    last_slash, last_dot = np.strings.rfind(keys, b"/"), np.strings.rfind(keys, b".")
    lengths = np.strings.str_len(keys)
    cut = np.where(last_dot > last_slash, last_dot, lengths)
    # splitext skips the leading dots of the last component (`.hidden`, `..x.y`): decide those rare
    # names one by one; for the rest, a dot after the last slash starts the extension.
    for i in np.flatnonzero((cut < lengths) & np.strings.startswith(keys, b".", last_slash + 1)):
        cut[i] = len(posixpath.splitext(keys[i])[0])
    narrow = max(1, int(cut.max()))  # no wider than the longest key: less to sort, store and send
    return np.strings.slice(keys, 0, cut).astype(f"S{narrow}")


# ---------------------------------------------------------------------------------------------
# The kept-key trie
# ---------------------------------------------------------------------------------------------


def trie_order(keys: np.ndarray) -> np.ndarray:
    """Sorted unique keys (bytes) reordered by their '/'-separated components: the order of the trie's nodes."""
    if len(keys) < 2:
        return keys
    # Component order is byte order with '/' below every other byte, so map '/' to 0x01 (or, should a
    # key hold 0x01 itself, compare split keys). Sorted keys are nearly always in component order
    # already (shard names of equal width): check that a block at a time, without a copy.
    def mapped(block: np.ndarray) -> np.ndarray:
        chars = byte_matrix(block)
        return np.where(chars == ord(TRIE_SEPARATOR), np.uint8(1), chars).view(keys.dtype).ravel()

    if any((byte_matrix(keys[i:i + TRIE_CHUNK_KEYS]) == 1).any() for i in range(0, len(keys), TRIE_CHUNK_KEYS)):
        return np.array(sorted(keys.tolist(), key=lambda k: k.split(b"/")), dtype=keys.dtype)
    previous = np.zeros(0, keys.dtype)
    for start in range(0, len(keys), TRIE_CHUNK_KEYS):
        block = np.concatenate([previous, mapped(keys[start:start + TRIE_CHUNK_KEYS])])
        if not (block[1:] >= block[:-1]).all():
            return keys[np.argsort(mapped(keys), kind="stable")]
        previous = block[-1:]
    return keys


def write_trie(f, keys: np.ndarray) -> None:
    """Pickle a pygtrie.StringTrie holding the sorted unique `keys` (UTF-8 bytes), each with value 1.

    pygtrie pickles a trie's root node as a flat list of walk commands (its `_Node.__getstate__`):
    `n, step_1 .. step_n, value` walks n steps down and sets a value, `-n` walks n steps up. Keys in
    component order give that list in one pass, so the list is streamed to the pickler from the keys
    instead of building the trie. Unpickled, it is the trie built key by key (the same mapping, nodes and
    behaviour); the bytes differ from pickling a built trie, which memoises and batches differently. No
    object is pickled twice, so the pickler keeps no memo (fast mode): its memo would hold every string.
    """
    state = pygtrie.StringTrie(separator=TRIE_SEPARATOR).__getstate__()
    state["_root"] = _StreamedNode(trie_order(keys))
    pickler = pickle.Pickler(f, protocol=PICKLE_PROTOCOL)
    pickler.fast = True
    pickler.dump(_Pickled(pygtrie.StringTrie, state))


class _Pickled:
    """Pickles as `cls()` given `state`, like an instance of cls would (cls's __setstate__ takes it)."""

    def __init__(self, cls: type, state: Any):
        self.cls, self.state = cls, state

    def __reduce__(self) -> tuple:
        return self.cls, (), self.state


class _StreamedNode:
    """Pickles as a pygtrie node whose command list is streamed from the keys."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys

    def __reduce__(self) -> tuple:  # (chained: the pickler takes the commands a block at a time, in C)
        return pygtrie._Node, (), _StreamedList(itertools.chain.from_iterable(_trie_commands(self.keys)))


class _StreamedList:
    """Pickles as a list whose items come from an iterator (pickle appends them in batches as they come)."""

    def __init__(self, items: Any):
        self.items = items

    def __reduce__(self) -> tuple:
        return list, (), None, self.items


def _trie_commands(keys: np.ndarray) -> Iterator[list]:
    """pygtrie's node commands for keys in component order, a list per block of keys: per key [-up,] down, its
    new steps, value. Nearly
    every key is the previous key's sibling (one step up, one down, its last component); their commands are
    laid out a run of siblings at a time, and only the first key of a folder is worked out step by step."""
    previous, previous_folder = None, None  # the previous key (text) and its folder (bytes, up to its last '/')
    separator = TRIE_SEPARATOR.encode()
    for start in range(0, len(keys), TRIE_CHUNK_KEYS):
        block = keys[start:start + TRIE_CHUNK_KEYS]
        cut = np.strings.rfind(block, separator) + 1
        folders = np.strings.slice(block, 0, cut)
        try:
            leaves = [leaf.decode("utf-8") for leaf in np.strings.slice(block, cut, np.strings.str_len(block)).tolist()]
            heads = np.flatnonzero(np.concatenate([[folders[0] != previous_folder], folders[1:] != folders[:-1]]))
            folder_texts = {h: folders[h].decode("utf-8") for h in heads.tolist()}
        except UnicodeDecodeError as e:
            raise UsageError(TRIE_FILE, f"a kept key is not UTF-8 ({e})", "fix the paths") from None
        commands: list[Any] = []
        ends = [*heads.tolist(), len(block)]
        _siblings(commands, leaves[:ends[0]])  # the previous block's last folder, continued
        if ends[0] > 0:
            previous = previous.rsplit(TRIE_SEPARATOR, 1)[0] + TRIE_SEPARATOR + leaves[ends[0] - 1] \
                if TRIE_SEPARATOR in previous else leaves[ends[0] - 1]
        for head, end in zip(ends[:-1], ends[1:]):
            text = folder_texts[head] + leaves[head]
            steps, old = text.split(TRIE_SEPARATOR), [] if previous is None else previous.split(TRIE_SEPARATOR)
            shared = 0
            while shared < min(len(old), len(steps)) and old[shared] == steps[shared]:
                shared += 1
            if shared < len(old):
                commands.append(shared - len(old))
            commands += (len(steps) - shared, *steps[shared:], TRIE_VALUE)
            _siblings(commands, leaves[head + 1:end])
            previous = folder_texts[head] + leaves[end - 1]
        previous_folder = folders[-1]
        yield commands


def _siblings(commands: list, leaves: list[str]) -> None:
    """Append the commands of a run of siblings of the key before them: per leaf, -1, 1, leaf, value."""
    run = [1] * (4 * len(leaves))
    run[0::4], run[2::4], run[3::4] = [-1] * len(leaves), leaves, [TRIE_VALUE] * len(leaves)
    commands += run


class _TrieUnpickler(pickle.Unpickler):
    """Unpickles a pygtrie trie and nothing else: a pickle names the callables it calls, and a kept-key file is
    a file people share, so any name a trie never needs is refused before anything is called (pickle's own
    documented way of restricting what a file may load)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in TRIE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which a pygtrie trie never needs")


def load_trie(path: str) -> pygtrie.StringTrie:
    """The kept-key trie written by prune.py (or by pickling any pygtrie.StringTrie). A file that is not one
    is refused without running anything it holds."""
    try:
        with open(path, "rb") as f:
            trie = _TrieUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RecursionError) as e:
        raise UsageError(path, f"is not a kept-key trie ({e})", f"pass the {TRIE_FILE} written by prune.py, or share "
                         f"{KEPT_KEYS_FILE}, which is read without pickle") from None
    if not isinstance(trie, pygtrie.StringTrie):
        raise UsageError(path, f"holds a {type(trie).__name__}, not a pygtrie.StringTrie",
                         f"pass the {TRIE_FILE} written by prune.py")
    return trie


def trie_search(trie: pygtrie.StringTrie, key: str) -> bool:
    """True if `key` (a path without its extension) was kept."""
    return trie.has_key(key)


# ---------------------------------------------------------------------------------------------
# kept_keys.npy and the webdataset filter
# ---------------------------------------------------------------------------------------------


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

    def __reduce__(self) -> tuple:
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


def shard_stem(url: str) -> str | None:
    """The shard part of a `<shard>/<key>` key: `00012` for `.../00012.tar`, `https://host/00012.tar?sig=x`,
    and `pipe:` commands (`pipe:aws s3 cp s3://b/00012.tar -`): the last word naming a .tar, .tgz or
    .tar.gz. None if no word does."""
    for word in reversed(url.removeprefix("pipe:").split()):
        name = word.strip("'\"").split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        for extension in SHARD_EXTENSIONS:
            if name.endswith(extension) and len(name) > len(extension):
                return name[: -len(extension)]
    return None


def key_forms(keys: Any) -> tuple[bool, bool]:
    """(whether some kept key holds a '/', whether every one does), for a trie or a KeptKeys."""
    if isinstance(keys, KeptKeys):
        some, every = False, len(keys) > 0
        for start in range(0, len(keys), SCAN_KEYS):
            slashed = (byte_matrix(np.asarray(keys.keys[start:start + SCAN_KEYS])) == ord("/")).any(axis=1)
            some, every = some or bool(slashed.any()), every and bool(slashed.all())
            if some and not every:
                break
        return some, every

    def node(path_conv: Any, path: tuple, children: Iterator, *value: Any) -> Any:
        if len(path) == 1:  # a first component: (it has a value: a key without '/', it has children: keys with one)
            return bool(value), next(children, None) is not None
        if len(path) == 0:
            tops = list(children)
            return any(nested for _, nested in tops), bool(tops) and not any(flat for flat, _ in tops)
        return True  # a node below the first component: never looked into

    return keys.traverse(node)


class WebdatasetFilter:
    """`sample -> bool` for `webdataset.WebDataset(urls).select(...)`; picklable for loader workers.

    The key of a sample is `<shard stem>/<__key__>` (with_shard True) or `__key__` alone (False). By default
    (None) it follows the kept keys' form: `__key__` when no kept key holds a '/' (clip-retrieval's
    image_path, LAION's key), else `__key__` when it holds a '/' itself and `<shard stem>/<__key__>` when it
    does not. A form that can never match a kept key is an error, not an empty data set."""

    def __init__(self, keys: Any, with_shard: bool | None, source: str):
        self.keys, self.with_shard, self.source = keys, with_shard, source
        self.some_nested, self.all_nested = key_forms(keys)
        if with_shard and not self.some_nested and len(self.keys):
            raise ValueError(f"with_shard=True makes keys <shard>/<__key__>, but no kept key in {source} holds a "
                             "'/': they are bare keys (leave with_shard out, or pass with_shard=False)")

    def __call__(self, sample: dict) -> bool:
        key = sample["__key__"]
        if self.with_shard or (self.with_shard is None and self.some_nested and "/" not in key):
            stem = shard_stem(sample["__url__"])
            if stem is None:  # better an error now than an empty data set later
                raise ValueError(f"no shard name in __url__ {sample['__url__']!r}: it names no .tar, .tgz or "
                                 ".tar.gz file, so the key <shard>/<__key__> cannot be made (pass with_shard=False "
                                 "if the member names hold whole keys)")
            key = f"{stem}/{key}"
        elif self.all_nested and "/" not in key:
            raise ValueError(f"the sample key {key!r} has no '/', but every kept key in {self.source} has one "
                             "(<shard>/<key>): it could never match (leave with_shard out, or pass with_shard=True)")
        return key in self.keys

    def __reduce__(self) -> tuple:  # the forms travel with it: a loader worker need not scan the keys again
        return _rebuilt_filter, (self.keys, self.with_shard, self.source, self.some_nested, self.all_nested)


def _rebuilt_filter(keys: Any, with_shard: bool | None, source: str, some: bool, every: bool) -> WebdatasetFilter:
    made = WebdatasetFilter.__new__(WebdatasetFilter)
    made.keys, made.with_shard, made.source, made.some_nested, made.all_nested = keys, with_shard, source, some, every
    return made


def webdataset_filter(trie_or_path: Any, with_shard: bool | None = None) -> WebdatasetFilter:
    """Keep the samples whose key was kept: `<shard stem>/<__key__>`, `__key__` alone, or (by default) whichever
    of the two the kept keys' form calls for."""
    source = trie_or_path if isinstance(trie_or_path, (str, os.PathLike)) else type(trie_or_path).__name__
    return WebdatasetFilter(_key_set(trie_or_path), with_shard, os.fspath(source) if source else "the keys")


def datacomp_subset(keys: np.ndarray) -> np.ndarray:
    """Kept keys that are DataComp uids (32 hex digits) as DataComp's resharder takes them (`--subset_file`):
    (high, low) 64-bit halves, dtype u8,u8, sorted, each once."""
    try:  # every key 32 hex digits: then the concatenated text is 16 bytes a key, big-endian halves
        raw = bytes.fromhex(keys.tobytes().decode("ascii")) if keys.dtype.itemsize == 32 else b"?"
        if len(raw) != 16 * len(keys):  # (fromhex skips spaces: fewer bytes)
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        bad = next(key for key in keys.tolist() if len(key) != 32 or not all(c in HEX_DIGITS for c in key.lower()))
        raise UsageError("--datacomp-subset", f"the kept key {bad.decode('utf-8', 'replace')!r} is not a DataComp "
                         "uid (32 hex digits)", "use it on DataComp data, whose keys are the uids") from None
    high, low = np.frombuffer(raw, ">u8").reshape(len(keys), 2).T
    rising = (high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] > low[:-1]))
    if not rising.all():  # sorted keys are sorted uids, but for upper-case digits (and a uid twice in two cases)
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        first = np.concatenate([[True], (high[1:] != high[:-1]) | (low[1:] != low[:-1])])
        high, low = high[first], low[first]
    subset = np.empty(len(high), DATACOMP_UID)
    subset["f0"], subset["f1"] = high, low
    return subset


# ---------------------------------------------------------------------------------------------
# prune.py's report
# ---------------------------------------------------------------------------------------------


def pruning_extremes(sizes: np.ndarray, quotas: np.ndarray, count: int = 3) -> str:
    """The most and least pruned clusters, in words, for the log."""
    full = np.flatnonzero(sizes > 0)
    fraction = quotas[full] / sizes[full]
    order = full[np.argsort(fraction, kind="stable")]

    def describe(js: np.ndarray) -> str:
        return ", ".join(f"cluster {j} keeps {quotas[j]} of {sizes[j]} ({quotas[j] / sizes[j]:.1%})" for j in js)
    return f"most pruned: {describe(order[:count])}; least pruned: {describe(order[::-1][:count])}"


def write_report(task: tuple[str, str, dict[str, np.ndarray], Quotas, int, str]) -> None:
    """cluster_stats.csv and quotas.png (they need only the quotas, so they are written beside the selection)."""
    stats_path, plot_path, table, plan, target, title = task
    with open(stats_path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(table)
        rows.writerows(zip(*(column.tolist() for column in table.values())))  # floats as repr: exact
    with open(plot_path, "wb") as f:
        plot_quotas(f, table, plan, target, title)


def plot_quotas(f, table: dict[str, np.ndarray], plan: Quotas, target: int, title: str) -> None:
    """What DBP did. Left: each cluster's quota N_j against its complexity C_j, beside the softmax target
    P_j N it follows (shifted by the water level nu where some clusters are capped) and the equal share N / k
    it departs from; marked, the clusters kept whole (smaller than their target) and those held at the
    per-cluster minimum. Right: per cluster, by complexity, its size and what it keeps, on a log scale (so
    that large clusters do not hide small quotas)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a faster import

    complexity, probs, quotas, sizes = table["complexity"], table["probability"], table["quota"], table["size"]
    share = probs * target
    order = np.argsort(complexity, kind="stable")
    whole = (sizes > 0) & (plan.x == plan.upper) & (share - plan.nu > plan.upper)  # all it has, less than its share
    raised = (plan.x == plan.lower) & (share - plan.nu < plan.lower) & ~whole  # held at the minimum, above it
    plain = ~whole & ~raised
    fig = Figure(figsize=(11, 4.2), dpi=100)
    left, right = fig.subplots(1, 2)
    left.plot(complexity[order], share[order], color="tab:orange", lw=1.2, label="softmax target $P_j N$")
    left.axhline(target / len(sizes), color="0.5", ls="--", lw=1, label="equal share $N / k$")
    left.scatter(complexity[plain], quotas[plain], s=9, color="tab:blue", zorder=3,
                 label=f"quota $N_j \\approx P_j N - \\nu$ ($\\nu$ = {plan.nu:.3g})")
    if whole.any():
        left.scatter(complexity[whole], quotas[whole], s=16, marker="v", color="tab:red", zorder=3,
                     label="kept whole (smaller than its target)")
    if raised.any():
        left.scatter(complexity[raised], quotas[raised], s=16, marker="^", color="tab:green", zorder=3,
                     label=f"held at the minimum m = {plan.min_per_cluster}")
    left.set(ylim=(0, 1.15 * max(float(share.max(initial=0)), float(quotas.max(initial=0)), 1.0)),
             xlabel="complexity $C_j$", ylabel="samples kept", title=title)
    left.legend(loc="upper left", fontsize=8)
    x = np.arange(len(order))
    right.bar(x, sizes[order], width=1.0, color="0.8", label="cluster size $n_j$")
    right.bar(x, quotas[order], width=1.0, color="tab:blue", label="kept $N_j$")
    right.set_yscale("log")
    right.set(xlim=(-0.5, len(x) - 0.5), xlabel="clusters, by complexity (lowest left)",
              ylabel="samples (log scale)", title="what each cluster keeps of what it has")
    right.legend(loc="upper left", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.25)  # (tight_layout: 3x slower)
    fig.savefig(f, format="png")
