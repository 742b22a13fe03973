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

import csv
import os
from dataclasses import dataclass

import numpy as np

from dbpkit.clusters import ClusterFile, parse_distances
from dbpkit.errors import UsageError
from dbpkit.files import atomic_open
from dbpkit.keys import as_lines, keys_as_utf8, strip_extensions
from dbpkit.layouts import load_embeddings
from dbpkit.trie import KEPT_KEYS_FILE  # noqa: F401 (each eps_<e>/ holds one, in prune.py's format)

BLOCK_ROWS = 1024  # rows of a block of similarities (and columns): 4 MB of float32
SCORES_DIR, MATCHES_DIR = "scores", "matches"  # per cluster: each row's score, and the row it duplicates
STATS_FILE = "dedup_stats.csv"  # per eps: kept, removed
CLUSTER_STATS_FILE = "dedup_cluster_stats.csv"  # per cluster: size, removed at each eps
PLOT_FILE = "similarity.png"
REMOVED_FILE = "removed_paths.txt"  # in each eps_<e>/, beside KEPT_KEYS_FILE
HISTOGRAM_BINS = np.linspace(0, 1, 201)  # of the scores, for the plot
EPS_GRID = np.logspace(-4, 0, 161)[:-1]  # eps values the plot reads the fraction removed at


def eps_folder(eps: float) -> str:
    return f"eps_{eps:g}"


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
    rows once: the strict lower triangle, never the whole square."""
    import torch

    n = len(x)
    best = torch.zeros(n, dtype=torch.float32, device=x.device)
    match = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    later = torch.ones(block, block, dtype=torch.bool, device=x.device).triu()  # j >= i on a diagonal block
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        rows = x[r0:r1]
        for c0 in range(0, r1, block):  # blocks of columns before the rows' end (the last is the diagonal)
            c1 = min(c0 + block, r1)
            sims = (rows @ x[c0:c1].T).float()
            if c0 == r0:
                sims.masked_fill_(later[:r1 - r0, :c1 - c0], -2.0)  # below any cosine
            value, where = sims.max(dim=1)
            better = value > best[r0:r1]  # strictly: earlier blocks keep their ties
            best[r0:r1] = torch.where(better, value, best[r0:r1])
            match[r0:r1] = torch.where(better, where + c0, match[r0:r1])
    return best.cpu().numpy(), match.cpu().numpy()


@dataclass(frozen=True)
class Scored:
    """What scoring one cluster noticed (its scores are in its files)."""

    rows: int
    sorted: bool


def score_cluster(task: tuple[ClusterFile, int, str, str, str, int, str]) -> Scored:
    """Score one cluster and write SCORES_DIR/cluster_<j>.npy and MATCHES_DIR/cluster_<j>.npy into `out`."""
    import torch

    cluster, j, embeddings_file, out, which, seed, device = task
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
    if cluster.rows > 1:
        wanted = indices[order]
        unique, position = np.unique(wanted, return_inverse=True)  # read in file order, each row once
        x = torch.from_numpy(embeddings.unit_rows_at(unique)[position])
        if device == "cuda":  # half precision: see the README on rounding near the threshold
            x = x.to("cuda", torch.float16)
        best, earlier = max_earlier_similarity(x)
        scores[order] = best
        matches[order] = np.where(earlier >= 0, order[np.maximum(earlier, 0)], -1)  # as rows of the file
    for folder, values in ((SCORES_DIR, scores), (MATCHES_DIR, matches)):  # the matches file marks it done
        with atomic_open(os.path.join(out, folder, f"cluster_{j}.npy")) as f:
            np.save(f, values)
    return Scored(cluster.rows, in_order)


def read_cluster(cluster: ClusterFile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys as UTF-8 bytes, row indices, distances) of a 4-column cluster file, checked: indices are
    non-negative integers, and no key appears twice (SemDeDup asserts as much)."""
    if cluster.rows == 0:
        return np.zeros(0, "S1"), np.zeros(0, np.int64), np.zeros(0)
    keys, text, distances = cluster.columns(("key", "index", "distance"), 0, cluster.rows)
    keys = keys_as_utf8(keys, cluster.path)
    try:
        indices = text.astype(np.int64)
    except (ValueError, OverflowError):  # find the culprit
        indices = np.array([int(i) if str(i).isdecimal() else -1 for i in text.tolist()])
    if (bad := np.flatnonzero(indices < 0)).size:
        raise UsageError(cluster.path, f"row {bad[0]}: index {text[bad[0]].item()!r} is not a row number",
                         "column 1 must hold each sample's row in the embeddings")
    order = np.argsort(keys, kind="stable")
    if (same := np.flatnonzero(keys[order][1:] == keys[order][:-1])).size:
        a, b = sorted(order[same[0]:same[0] + 2])
        raise UsageError(cluster.path, f"key {keys[a].decode('utf-8', 'replace')!r} appears twice (rows {a} and {b})",
                         "each sample may be in a cluster once (SemDeDup asserts it); remove the repeat")
    return keys, indices, parse_distances(distances, cluster.path)


@dataclass(frozen=True)
class Removed:
    """One cluster at every eps: how many rows each removes, and the scores' histogram and curve."""

    removed: list[int]
    histogram: np.ndarray  # of the scores, over HISTOGRAM_BINS
    curve: np.ndarray  # rows removed at each eps of EPS_GRID


def eps_part(parts: str, eps: float, cluster_id: int) -> str:
    return os.path.join(parts, f"{eps_folder(eps)}_{cluster_id}")


def select_eps(task: tuple[ClusterFile, int, str, list[float], str]) -> Removed:
    """For one cluster and every eps, write a part file: its kept keys (stripped, sorted; a .npy) followed by its
    removed paths as lines of removed_paths.txt (path, the path it duplicates, the similarity)."""
    cluster, j, out, eps_list, parts = task
    if cluster.rows:
        (keys,) = cluster.columns(("key",), 0, cluster.rows)
        keys = keys_as_utf8(keys, cluster.path)
    else:
        keys = np.zeros(0, "S1")
    scores = np.load(os.path.join(out, SCORES_DIR, f"cluster_{j}.npy"))
    matches = np.load(os.path.join(out, MATCHES_DIR, f"cluster_{j}.npy"))
    removed = []
    for eps in eps_list:
        gone = scores > threshold(eps)
        removed.append(int(gone.sum()))
        with open(eps_part(parts, eps, j), "wb") as f:
            kept = keys[~gone]
            np.save(f, np.sort(strip_extensions(kept)) if len(kept) else np.zeros(0, "S1"))
            f.write(removed_lines(keys[gone], keys[matches[gone]], scores[gone]))
    curve = len(scores) - np.searchsorted(np.sort(scores), threshold_grid(), side="right")
    return Removed(removed, np.histogram(scores, HISTOGRAM_BINS)[0], curve)


def threshold_grid() -> np.ndarray:
    return np.array([threshold(eps) for eps in EPS_GRID], np.float32)


def removed_lines(paths: np.ndarray, duplicated: np.ndarray, scores: np.ndarray) -> bytes:
    """`path<TAB>the path it duplicates<TAB>similarity` lines."""
    if len(paths) == 0:
        return b""
    similarity = scores.astype(str).astype("S")  # float32's shortest text
    return as_lines(np.strings.add(np.strings.add(np.strings.add(paths, b"\t"), np.strings.add(duplicated, b"\t")),
                                   similarity))


def write_stats(path: str, eps_list: list[float], total: int, removed: np.ndarray) -> None:
    """dedup_stats.csv: per eps, the similarity threshold, kept, removed and the fraction removed."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["eps", "threshold", "kept", "removed", "removed_fraction"])
        for eps, gone in zip(eps_list, removed.sum(axis=0).tolist()):
            rows.writerow([eps, float(threshold(eps)), total - gone, gone, gone / total if total else 0.0])


def write_cluster_stats(path: str, eps_list: list[float], sizes: np.ndarray, removed: np.ndarray) -> None:
    """dedup_cluster_stats.csv: per cluster, its size and how many rows each eps removes."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["cluster_id", "size", *(f"removed_{eps_folder(eps)}" for eps in eps_list)])
        rows.writerows([j, size, *gone] for j, (size, gone) in enumerate(zip(sizes.tolist(), removed.tolist())))


def plot_similarity(path: str, eps_list: list[float], removed: np.ndarray, histogram: np.ndarray, curve: np.ndarray,
                    total: int) -> None:
    """similarity.png. Left: how the scores (each member's largest similarity to an earlier one) are spread,
    with each eps's threshold 1 - eps. Right: the fraction removed for every eps, read off to choose one."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a faster import

    fig = Figure(figsize=(11, 4.2), dpi=100)
    left, right = fig.subplots(1, 2)
    left.stairs(histogram, HISTOGRAM_BINS, fill=True, color="0.6")  # one artist, not 200 bars: 5x faster to draw
    left.set_yscale("log")
    fraction = curve / max(total, 1)
    right.plot(EPS_GRID, fraction, color="0.3", lw=1.2)
    for i, eps in enumerate(eps_list):
        gone = removed[i] / max(total, 1)
        color = f"C{i % 10}"
        left.axvline(1 - eps, color=color, lw=1.2, ls="--", label=f"eps {eps:g}: {gone:.1%} removed")
        right.scatter([eps], [gone], color=color, zorder=3, label=f"eps {eps:g}: {gone:.1%}")
    left.set(xlabel="largest cosine similarity to an earlier member", ylabel="members (log scale)",
             title=f"SemDeDup scores of {total} members")
    left.legend(loc="upper left", fontsize=8)
    right.set_xscale("log")
    right.set(xlabel="eps (a member goes when its similarity > 1 - eps)", ylabel="fraction removed",
              ylim=(0, 1.02), title="what each eps removes")
    right.legend(loc="upper left", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.25)  # (tight_layout: 3x slower)
    fig.savefig(path, format="png")
