"""SemDeDup's semantic deduplication (step 1 of the paper), exact, on the CPU, in bounded memory.

Within each k-means cluster, its members are taken in keep order: `hard` keeps the member farthest from
the centroid of each group of near-duplicates, `easy` the nearest, `random` a seeded random one. A
member's score is the largest cosine similarity to any member earlier in that order, clipped at 0 (the
first scores 0): SemDeDup's `max(triu(S, 1), dim=0)`. At eps it is removed when its score > 1 - eps, in
float32 as SemDeDup compares; removed members still count as earlier ones for those after them.

The similarities are worked out a block of rows against a block of earlier rows at a time (the strict
lower triangle, half of SemDeDup's square), with torch matmuls: memory is O(block^2) for any cluster
size. Each cluster is a task: it writes its scores (float32, one per row of its file, in the file's
order) and each member's best earlier match (its row in the file, -1 for none) into the run's folder.
Choosing eps then only reads those back.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dbpkit.clusters import ClusterFile, parse_distances, parse_row_numbers
from dbpkit.errors import LateMistake, UsageError
from dbpkit.files import atomic_open, write_npy
from dbpkit.keys import as_lines, keys_as_utf8, strip_extensions
from dbpkit.layouts import Embeddings, load_embeddings
from dbpkit.layouts import unit_rows as unit_length
from dbpkit.trie import KEPT_KEYS_FILE  # noqa: F401 (each eps_<e>/ holds one, in prune.py's format)

BLOCK_ROWS = 1024  # rows of a block of similarities (and columns): 4 MB of float32
STRIP_COLUMNS = 256  # a full diagonal block is worked out in strips this wide
SCORES_DIR, MATCHES_DIR = "scores", "matches"  # per cluster: each row's score, and the row it duplicates
STATS_FILE = "dedup_stats.csv"  # per eps: kept, removed
CLUSTER_STATS_FILE = "dedup_cluster_stats.csv"  # per cluster: size, removed at each eps
PLOT_FILE = "similarity.png"
REMOVED_FILE = "removed_paths.txt"  # in each eps_<e>/, beside KEPT_KEYS_FILE
CURVE_FILE = "eps_curve.csv"  # the fraction removed over EPS_GRID: what similarity.png's right panel draws
DISTANCE_FLOOR = 1e-7  # 1 - score below this (float32's resolution near 1) is drawn at it
HISTOGRAM_BINS = np.logspace(-7, 0, 141)  # of 1 - score, log-spaced so that scores bunched near 1 separate
EPS_GRID = np.logspace(-4, 0, 161)[:-1]  # eps values the plot reads the fraction removed at
# Identical embeddings score 1 only up to their matmul's rounding: within 1e-6 of it in float32 (measured, dims 64
# to 1024), within float16's step near 1 (0.00049) with --device cuda. A smaller eps can keep some exact copies.
COPIES_EPS = {"cpu": 1e-5, "cuda": 1e-3}
# The embeddings are checked to be those the clusters were made from on the first row of this many clusters: its
# distance to the centroid, recomputed, within this of the cluster file's (measured: rounding ~1e-7, the same
# embeddings stored as float16 since up to 1e-4 at dim 64; random embeddings ~0.7)
CHECKED_CLUSTERS, MADE_FROM_TOLERANCE = 64, 1e-3


def eps_folder(eps: float) -> str:
    return f"eps_{eps:g}"


def rounding_warnings(eps_list: list[float], device: str) -> list[str]:
    """A warning for each eps too small to remove every exact copy (COPIES_EPS)."""
    floor, dtype = COPIES_EPS[device], "float16" if device == "cuda" else "float32"
    return [f"eps {eps:g} is within {dtype}'s rounding of a similarity of 1: identical embeddings can score below "
            f"1 - eps and be kept; eps {floor:g} or more removes every exact copy" for eps in eps_list if eps < floor]


def threshold(eps: float) -> np.float32:
    """1 - eps as SemDeDup compares it: a Python float against a float32 tensor, so in float32."""
    return np.float32(1 - eps)


def keep_order(rows: int, distances: np.ndarray, which: str, seed: int, cluster_id: int) -> tuple[np.ndarray, bool]:
    """A cluster's rows in keep order, and whether its file was sorted. A file is ascending when its distances
    never fall and rise somewhere, else descending (SemDeDup's default): hard keeps its rows' order there
    and easy reverses it, exactly as SemDeDup does. An unsorted file is sorted here (stably)."""
    if which == "random":  # one stream per cluster: identical for any number of workers
        return np.random.default_rng([seed, cluster_id]).permutation(rows), True
    steps = np.diff(distances)
    ascending = bool((steps >= 0).all() and (steps > 0).any())
    descending = bool((steps <= 0).all())
    far_first = which == "hard"
    if ascending or descending:
        in_file = np.arange(rows)
        return (in_file if far_first == descending else in_file[::-1]), True
    return np.argsort(-distances if far_first else distances, kind="stable"), False


def max_earlier_similarity(x, block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """For each row i of the unit rows x (a torch tensor, in keep order): max(0, max_{j<i} x_i . x_j), and that j
    (the first of equals; -1 where no similarity is above 0). A block of rows meets each block of earlier
    rows once: the strict lower triangle, never the whole square. A full block on the diagonal is worked out
    as strips of STRIP_COLUMNS columns, each from its own diagonal down: 3/8 fewer multiply-adds there."""
    n = len(x)
    best, match = np.zeros(n, np.float32), np.full(n, -1, np.int64)
    out = x.new_empty(min(block, n) ** 2)  # a block's similarities, reused
    can_strip = block % STRIP_COLUMNS == 0 and n >= block > STRIP_COLUMNS  # (tests pass other blocks)
    strips = can_strip and strips_match(block, x.shape[1], x.dtype, x.device)

    def fold(r0: int, r1: int, c0: int, c1: int) -> None:  # rows r0..r1 against columns c0..c1
        sims = _mm(x[r0:r1], x[c0:c1], out)
        if c0 == r0:
            sims[:c1 - c0].tril_(-1)  # j >= i: 0, which never beats the 0 every row starts from
        value, where = row_max(sims)
        better = value > best[r0:r1]  # strictly: earlier columns keep their ties
        best[r0:r1][better] = value[better]
        match[r0:r1][better] = where[better] + c0

    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        for c0 in range(0, r0, block):  # blocks wholly below the diagonal
            fold(r0, r1, c0, c0 + block)
        if strips and r1 - r0 == block:
            for s0 in range(r0, r1, STRIP_COLUMNS):
                fold(s0, r1, s0, s0 + STRIP_COLUMNS)
        else:
            fold(r0, r1, r0, r1)
    return best, match


def _mm(rows, columns, out):
    """rows @ columns.T into the front of the flat buffer `out`."""
    import torch

    return torch.mm(rows, columns.T, out=out[:len(rows) * len(columns)].view(len(rows), len(columns)))


@functools.cache
def strips_match(block: int, dim: int, dtype, device) -> bool:
    """Whether this machine's GEMM gives a diagonal block's strips the same bits as the whole block: the order it
    sums in depends on the shapes it is given, and the scores must not change with the way they are cut.
    Checked once per process on random rows (that order does not depend on the values); if not, whole
    blocks."""
    import torch

    x = torch.randn(block, dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    whole = torch.mm(x, x.T)
    return all(torch.equal(torch.mm(x[s:], x[s:s + STRIP_COLUMNS].T), whole[s:, s:s + STRIP_COLUMNS])
               for s in range(0, block, STRIP_COLUMNS))


def row_max(sims) -> tuple[np.ndarray, np.ndarray]:
    """Each row's largest value (float32) and its first column holding it, as numpy arrays."""
    if sims.device.type == "cpu":  # numpy's argmax, one pass: 3x faster than torch's max(dim=1) on the CPU
        where = sims.numpy().argmax(axis=1)
        return sims.numpy()[np.arange(len(where)), where], where
    value, where = sims.max(dim=1)
    return value.float().cpu().numpy(), where.cpu().numpy()


@dataclass(frozen=True)
class Removed:
    """One cluster at every eps: how many rows each removes, and the scores' histogram and curve (int32 below 2^31
    rows: so small a result goes back through the pool's pipe, not a file)."""

    removed: list[int]
    histogram: np.ndarray  # of 1 - the scores, over HISTOGRAM_BINS
    curve: np.ndarray  # rows removed at each eps of EPS_GRID


@dataclass(frozen=True)
class Scored:
    """What scoring one cluster noticed (its scores are in its files), and what each eps removes of it."""

    rows: int
    sorted: bool
    selection: Removed


def score_cluster(task: tuple[ClusterFile, int, str, str, str, int, str, list[float], str]) -> Scored:
    """Score one cluster and write SCORES_DIR/cluster_<j>.npy and MATCHES_DIR/cluster_<j>.npy into `out`, and
    its part file for each eps into `parts` (as select_eps does, from the keys already read: each cluster file
    is read once)."""
    import torch

    cluster, j, embeddings_file, out, which, seed, device, eps_list, parts = task
    torch.set_num_threads(1)  # the clusters are the parallelism, and one thread sums the same way every time
    keys, indices, distances = read_cluster(cluster)
    embeddings = load_embeddings(embeddings_file)
    if len(indices) and indices.max() >= embeddings.rows:
        row = int(np.argmax(indices >= embeddings.rows))
        raise UsageError(cluster.path, f"row {row}: index {indices[row]} is past the {embeddings.rows} rows of the "
                         "embeddings", "pass the embeddings these clusters were made from (--embeddings)")
    order, in_order = keep_order(cluster.rows, distances, which, seed, j)
    scores = np.zeros(cluster.rows, np.float32)
    matches = np.full(cluster.rows, -1, np.int64)
    if cluster.rows > 1:  # (the rows are freed before the selection below)
        best, earlier = max_earlier_similarity(unit_rows(embeddings, indices[order], device))
        scores[order] = best
        matches[order] = np.where(earlier >= 0, order[np.maximum(earlier, 0)], -1)  # as rows of the file
    removed = select_rows(keys, scores, matches, j, eps_list, parts)
    for folder, values in ((SCORES_DIR, scores), (MATCHES_DIR, matches)):  # the matches file marks it done
        with atomic_open(os.path.join(out, folder, f"cluster_{j}.npy")) as f:
            write_npy(f, values)
    return Scored(cluster.rows, in_order, removed)


def unit_rows(embeddings: Embeddings, rows: np.ndarray, device: str):
    """The unit embeddings at `rows`, in that order, as a torch tensor on `device` (each row read once, in the
    file's order)."""
    import torch

    unique, position = np.unique(rows, return_inverse=True)
    x = torch.from_numpy(embeddings.unit_rows_at(unique)[position])
    if device == "cuda":  # half precision: see the README on rounding near the threshold
        x = x.to("cuda", torch.float16)
    return x


def read_cluster(cluster: ClusterFile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys as UTF-8 bytes, row indices, distances) of a 4-column cluster file, checked: indices are
    non-negative integers, and no key appears twice (SemDeDup asserts as much)."""
    if cluster.rows == 0:
        return np.zeros(0, "S1"), np.zeros(0, np.int64), np.zeros(0)
    keys, text, distances = cluster.columns(("key", "index", "distance"), 0, cluster.rows)
    keys = keys_as_utf8(keys, cluster.path)
    try:
        indices = parse_row_numbers(text)
    except (ValueError, OverflowError):  # find the culprit
        indices = np.array([int(i) if str(i).isdecimal() else -1 for i in text.tolist()])
    if (bad := np.flatnonzero(indices < 0)).size:
        raise UsageError(cluster.path, f"row {bad[0]}: index {text[bad[0]].item()!r} is not a row number",
                         "column 1 must hold each sample's row in the embeddings")
    if len(set(keys.tolist())) < len(keys):  # a repeat (3x faster to learn than by sorting): find the first
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        a, b = sorted(order[same[0]:same[0] + 2])
        raise UsageError(cluster.path, f"key {keys[a].decode('utf-8', 'replace')!r} appears twice (rows {a} and {b})",
                         "each sample may be in a cluster once (SemDeDup asserts it); remove the repeat")
    return keys, indices, parse_distances(distances, cluster.path)


def check_made_from(clusters: list[ClusterFile], embeddings: Embeddings, centroids: np.ndarray, fix: str) -> None:
    """Refuse embeddings that are not those the clusters were made from (another model's of the same dimension,
    another data set's): the first row of up to CHECKED_CLUSTERS clusters, spread over all of them, must be at
    the cosine distance from its centroid that its cluster file says (cluster_embeddings.py's files: 1 - the
    cosine to the centroid's direction, in float64). `fix` says which embeddings the clusters name."""
    nonempty = [(j, c) for j, c in enumerate(clusters) if c.rows]
    picked = nonempty[::max(1, len(nonempty) // CHECKED_CLUSTERS)][:CHECKED_CLUSTERS]
    firsts = [c.columns(("index", "distance"), 0, 1) for _, c in picked]
    try:
        rows = np.array([parse_row_numbers(index)[0] for index, _ in firsts], np.int64)
    except (ValueError, OverflowError):  # (refused with its row when its cluster is read)
        return
    if len(rows) == 0 or rows.min() < 0 or rows.max() >= embeddings.rows:
        return
    said = np.array([parse_distances(distance, c.path)[0] for (_, c), (_, distance) in zip(picked, firsts)])
    ids = np.array([j for j, _ in picked])
    order = np.argsort(rows)
    x = np.empty((len(rows), embeddings.dim))
    x[order] = embeddings.unit_rows_at(rows[order])
    distance = 1 - np.einsum("ij,ij->i", x, unit_length(centroids[ids]))  # (as kmeans.assign_rows wrote it)
    if (wrong := np.flatnonzero(np.abs(distance - said) > MADE_FROM_TOLERANCE)).size:
        i = wrong[0]
        raise UsageError("--embeddings", f"row {rows[i]} is not the embedding {picked[i][1].path} was made from: its "
                         f"cosine distance to centroid {ids[i]} is {distance[i]:.6f}, the cluster file says "
                         f"{said[i]:.6f}", fix)


def eps_part(parts: str, eps: float, cluster_id: int) -> str:
    return os.path.join(parts, f"{eps_folder(eps)}_{cluster_id}")


def select_eps(task: tuple[ClusterFile, int, str, list[float], str]) -> Removed:
    """select_rows for a cluster scored earlier: its keys read again, its scores and matches from `out`."""
    cluster, j, out, eps_list, parts = task
    if cluster.rows:
        (keys,) = cluster.columns(("key",), 0, cluster.rows)
        keys = keys_as_utf8(keys, cluster.path)
    else:
        keys = np.zeros(0, "S1")
    scores = np.load(os.path.join(out, SCORES_DIR, f"cluster_{j}.npy"))
    matches = np.load(os.path.join(out, MATCHES_DIR, f"cluster_{j}.npy"))
    return select_rows(keys, scores, matches, j, eps_list, parts)


def select_rows(keys: np.ndarray, scores: np.ndarray, matches: np.ndarray, j: int, eps_list: list[float],
                parts: str) -> Removed:
    """Cluster j's part file at every eps (write_parts; none when the eps are not known yet, as for scoring tasks
    before --remove-fraction's), and the histogram and curve of its scores."""
    removed = write_parts(keys, scores, matches, j, eps_list, parts) if eps_list else []
    curve = len(scores) - np.searchsorted(np.sort(scores), threshold_grid(), side="right")
    distance = np.clip(1 - scores.astype(np.float64), DISTANCE_FLOOR, 1)
    counts = np.int32 if len(scores) <= np.iinfo(np.int32).max else np.int64  # (no count of a cluster wraps)
    return Removed(removed, np.histogram(distance, HISTOGRAM_BINS)[0].astype(counts), curve.astype(counts))


def write_parts(keys: np.ndarray, scores: np.ndarray, matches: np.ndarray, j: int, eps_list: list[float],
                parts: str) -> list[int]:
    """For cluster j and every eps, write a part file: its kept keys (stripped, sorted; a .npy) followed by its
    removed paths as lines of removed_paths.txt (path, the path it duplicates, the similarity). Returns how many
    rows each eps removes."""
    # Worked out once for every eps: the stripped keys in sorted order, and the lines of the rows the largest
    # eps removes (each smaller eps removes a subset of those).
    stripped = strip_extensions(keys)
    by_key = np.argsort(stripped, kind="stable")
    stripped = stripped[by_key]
    widths = np.strings.str_len(stripped)
    candidates = np.flatnonzero(scores > threshold(max(eps_list, default=0)))
    lines = removed_lines(keys[candidates], keys[matches[candidates]], scores[candidates])
    removed = []
    for eps in eps_list:
        gone = scores > threshold(eps)
        removed.append(int(gone.sum()))
        with open(eps_part(parts, eps, j), "wb") as f:
            kept = ~gone[by_key]
            width = max(1, int(widths[kept].max(initial=0)))  # as narrow as the kept keys alone need
            write_npy(f, stripped[kept].astype(f"S{width}") if kept.any() else np.zeros(0, "S1"))
            f.write(as_lines(lines[gone[candidates]]))
    return removed


def eps_removing(out: str, count: int, fraction: float, rows: int) -> tuple[float, int]:
    """The eps that removes exactly the rows whose score is at least the m-th largest, m = ceil(fraction x rows)
    (rows tied with it included), from the score files of clusters 0..count-1 under `out`; and how many it
    removes. Exact in bounded memory: a first pass counts the scores by the top 16 bits of their float32
    pattern (in order for scores >= 0), a second gathers only those in the bucket holding the m-th."""
    m = math.ceil(fraction * rows)
    if rows == 0:
        raise UsageError("--remove-fraction", "the clusters hold no rows", "pass clusters with rows")
    buckets = np.zeros(1 << 16, np.int64)
    for bits in _score_bits(out, count):
        buckets += np.bincount(bits >> 16, minlength=1 << 16)
    from_top = np.cumsum(buckets[::-1])
    bucket = len(buckets) - 1 - int(np.searchsorted(from_top, m))
    higher = int(from_top[len(buckets) - 2 - bucket]) if bucket < len(buckets) - 1 else 0
    inside = np.sort(np.concatenate([b[(b >> 16) == bucket] for b in _score_bits(out, count)]))[::-1]
    mth = inside[m - higher - 1].view(np.float32)
    if mth <= 0:
        scoring = int(sum((b > 0).sum() for b in _score_bits(out, count)))
        raise LateMistake("--remove-fraction", f"{fraction:g} asks for {m} rows, but only {scoring} score above 0 "
                          "(the rest have no earlier member alike at all)", f"pass at most {scoring / rows:.4g}: "
                          "the scores are kept, and the rerun uses them")
    line = np.nextafter(mth, np.float32(-1))  # the largest float32 below the m-th score: removed iff score > line
    eps = 1.0 - float(line)  # exact: 1 - eps gives `line` back, as threshold() compares
    assert threshold(eps) == line
    return eps, higher + int((inside >= inside[m - higher - 1]).sum())


def _score_bits(out: str, count: int) -> Iterator[np.ndarray]:
    """Each cluster's scores as their float32 bit patterns (uint32: in the scores' order, the scores being >= 0;
    a -0.0 made +0.0)."""
    for j in range(count):
        yield (np.load(os.path.join(out, SCORES_DIR, f"cluster_{j}.npy")) + np.float32(0)).view(np.uint32)


def threshold_grid() -> np.ndarray:
    return np.array([threshold(eps) for eps in EPS_GRID], np.float32)


def removed_lines(paths: np.ndarray, duplicated: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Lines of removed_paths.txt, without their newline (as_lines adds it): `path<TAB>the path it
    duplicates<TAB>similarity`."""
    if len(paths) == 0:
        return np.zeros(0, "S1")
    similarity = scores.astype(str).astype("S")  # float32's shortest text
    return np.strings.add(np.strings.add(np.strings.add(paths, b"\t"), np.strings.add(duplicated, b"\t")), similarity)
