"""Density-Based Pruning (DBP): the method, and the loader API for the samples it keeps.

Read top to bottom, this is the paper's pipeline after k-means: d_intra and d_inter per cluster, the
complexity C = d_intra * d_inter, the softmax over clusters and the exact quota solver; then what a data
loader uses to filter a webdataset with the kept keys (`load_trie`, `trie_search`, `load_kept_keys`,
`webdataset_filter`). How each cluster's members are selected and written, and every other piece of the
command-line plumbing, is in the `dbpkit` package beside this file.

`import dbp_utils` loads numpy, pygtrie and the light parts of dbpkit (no progress bars, processes, torch
or faiss: faiss and matplotlib are imported inside the functions that need them), so a training data
loader stays light. The method's errors name no command-line flag (MethodError); the scripts add it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pygtrie

from dbpkit import __version__  # noqa: F401 (for users)
from dbpkit.clusters import ClusterFile, parse_distances
from dbpkit.errors import MethodError, UsageError
from dbpkit.files import LOG_FILE, PARAMS_FILE, read_npy_header
from dbpkit.keys import byte_matrix, datacomp_subset, strip_extensions  # noqa: F401 (the loader API's too)
from dbpkit.kmeans import exact_faiss, fit
from dbpkit.layouts import unit_rows
from dbpkit.prune_report import PLOT_FILE, STATS_FILE  # written there
from dbpkit.samples import SHARD_EXTENSIONS, shard_stem  # noqa: F401 (the loader API's)
from dbpkit.selection import KeptKeyCollector, kept_rows  # noqa: F401 (the method's selection, for users)
from dbpkit.trie import KEPT_KEYS_FILE, TRIE_FILE, load_trie, trie_order, write_trie  # noqa: F401

DENSITIES = ("dintra*dinter", "dinter*dintra", "dintra", "dinter", "uniform", "clustersize")
WHICH_TO_KEEP = ("hard", "easy", "random")
KEPT_PATHS_FILE = "kept_paths.txt"
PRUNED_PATHS_FILE = "pruned_paths.txt"  # with --pruned-paths
QUOTAS_FILE = "quotas.npy"
SWEEP_FILE = "temperature_sweep.csv"  # what other temperatures would do
DATACOMP_FILE = "datacomp_subset.npy"  # with --datacomp-subset
OUTPUT_FILES = (KEPT_PATHS_FILE, PRUNED_PATHS_FILE, KEPT_KEYS_FILE, TRIE_FILE, DATACOMP_FILE, QUOTAS_FILE, STATS_FILE,
                SWEEP_FILE,
                PLOT_FILE, LOG_FILE, PARAMS_FILE)
SCAN_KEYS = 1 << 18  # kept keys looked at a block at a time for their form
log = logging.getLogger("dbp")  # (the scripts' log; a loader's own handlers decide what it shows)


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
        raise MethodError("density", f"{density} overflows: d_intra and d_inter are too large to multiply",
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
        raise MethodError("target", f"asks to keep {target} samples but the clusters hold only {upper.sum()}",
                          "keep fewer, or count the data set's size again")
    if lower.sum() > target:
        raise MethodError("cls_bal_ratio", f"its per-cluster minimum {m} needs {lower.sum()} samples, more than "
                          f"the {target} kept", "lower the minimum, or keep more")
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
# What the temperature does: the quotas at other T, for choosing it from the data
# ---------------------------------------------------------------------------------------------


SWEEP_COLUMNS = ("temperature", "p_ratio", "quota_min", "quota_median", "quota_max", "kept_whole", "at_minimum",
                 "moved_fraction")
SWEEP_SPREADS = np.geomspace(1.05, 100, 13)  # largest / smallest P the grid of T goes through
NEAR_EQUAL = 1.1  # a softmax that spreads P less than this barely moves the quotas from the equal share


def p_ratio(probs: np.ndarray, sizes: np.ndarray) -> float:
    """Largest / smallest probability of the clusters that hold rows (an empty one takes nothing either way)."""
    held = probs[sizes > 0] if (sizes > 0).any() else probs
    return float(held.max() / held.min()) if held.min() > 0 else float("inf")


def temperature_for(spread: float, complexity: np.ndarray, sizes: np.ndarray) -> float | None:
    """The T at which softmax(C / T) spreads P by `spread` (largest / smallest), or None when C is flat."""
    held = complexity[sizes > 0] if (sizes > 0).any() else complexity
    width = float(held.max() - held.min())
    return width / float(np.log(spread)) if width > 0 else None


def temperature_sweep(density: str, complexity: np.ndarray, sizes: np.ndarray, target: int, cls_bal_ratio: float,
                      temperature: float) -> dict[str, np.ndarray]:
    """SWEEP_COLUMNS for a grid of T that spreads P from 1.05x to 100x, and the run's T: what the quotas would
    be at each (min, median, max), how many clusters are kept whole or held at the minimum, and how far the
    quotas move from the equal share N / k (sum_j |N_j - N / k| / 2N: 0 is balanced pruning)."""
    grid = [t for spread in SWEEP_SPREADS if (t := temperature_for(spread, complexity, sizes)) is not None]
    rows = []
    for t in sorted({*grid, temperature}):
        probs = cluster_probabilities(density, complexity, t)
        plan = solve_quotas(probs, sizes, target, cls_bal_ratio)
        n = plan.quotas
        rows.append((t, p_ratio(probs, sizes), n.min(), float(np.median(n)), n.max(),
                     int(((n == sizes) & (sizes > 0)).sum()), int(((n == plan.lower) & (plan.lower < sizes)).sum()),
                     float(np.abs(n - target / len(n)).sum() / (2 * target)) if target else 0.0))
    return {name: np.array(column) for name, column in zip(SWEEP_COLUMNS, zip(*rows))}


# ---------------------------------------------------------------------------------------------
# What k does: the clusters of a training sample at several k, for choosing it from the data
# ---------------------------------------------------------------------------------------------


K_SWEEP_COLUMNS = ("k", "objective", "size_min", "size_median", "size_max", "dintra_spread", "complexity_spread")
SWEEP_CHUNK = 1 << 13  # sample rows compared with the centroids at a time


def k_sweep(x: np.ndarray, ks: list[int], niter: int, seed: int, spherical: bool,
            threads: int, fits: dict | None = None) -> dict[str, np.ndarray]:
    """K_SWEEP_COLUMNS for each k: k-means of the unit rows x at that k (the run's seed and iterations), its
    objective, the sizes of its clusters on x, and the spread (max - min) of d_intra and of d_intra x d_inter
    over the clusters that hold rows: what DBP's softmax will see (at T, shares spread exp(spread / T)).
    `fits`, when given, receives each k's (centroids, objective)."""
    rows = []
    for k in ks:
        centroids, objective = fit(x, k, niter, seed, spherical, threads)
        if fits is not None:
            fits[k] = centroids, objective
        unit = unit_rows(centroids.astype(np.float64)).astype(np.float32)
        labels, distance = np.empty(len(x), np.int64), np.empty(len(x))
        for start in range(0, len(x), SWEEP_CHUNK):
            sims = x[start:start + SWEEP_CHUNK] @ unit.T
            labels[start:start + SWEEP_CHUNK] = sims.argmax(axis=1)
            distance[start:start + SWEEP_CHUNK] = 1 - sims.max(axis=1)
        sizes = np.bincount(labels, minlength=k)
        with np.errstate(invalid="ignore"):
            d_intra = np.bincount(labels, weights=distance, minlength=k) / sizes
        d_inter = mean_centroid_distances(centroids, min(20, k - 1), threads) if k > 1 else np.zeros(1)
        c = complexity("dintra*dinter", d_intra, d_inter, sizes)
        held = sizes > 0
        rows.append((k, objective, sizes.min(), float(np.median(sizes)), sizes.max(),
                     float(np.ptp(d_intra[held])), float(np.ptp(c[held]))))
    return {name: np.array(column) for name, column in zip(K_SWEEP_COLUMNS, zip(*rows))}


# ---------------------------------------------------------------------------------------------
# The loader API: the kept keys and the webdataset filter
# ---------------------------------------------------------------------------------------------


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
