"""What make_report.py shows, read from the runs' outputs: the funnel, the clusters to show and their
members at the strips, and deduplication's pairs per eps.

Everything here reads only what it shows: a cluster's rows at its strips (never its whole file), and a
removed_paths.txt streamed a chunk of lines at a time (bounded memory for any size of run).
"""

from __future__ import annotations

import csv
import filecmp
import itertools
import os
from dataclasses import dataclass, field

import numpy as np

from dbpkit.clusters import ClusterFile, scan_clusters
from dbpkit.dedup import REMOVED_FILE, STATS_FILE, eps_folder
from dbpkit.errors import UsageError
from dbpkit.files import PARAMS_FILE, load_json
from dbpkit.keys import as_text, keys_as_utf8, strip_extensions
from dbpkit.kmeans import CLUSTERING_FILE, clustering_record
from dbpkit.prune_report import STATS_FILE as PRUNE_STATS_FILE
from dbpkit.samples import FAILED_FILE
from dbpkit.trie import KEPT_KEYS_FILE

INDEX_EXTREMES = 10  # simplest and most complex clusters drawn as strips on the index page
PAIR_LINES = 1 << 16  # lines of removed_paths.txt read at a time


@dataclass
class Member:
    """One cluster member on a strip: its key as in the cluster file, its distance to the centroid, its fate."""

    key: str
    distance: float
    kept: bool


@dataclass
class ClusterView:
    cluster_id: int
    stats: dict
    strips: dict[str, list[Member]]  # "nearest", "cut", "farthest": each ordered by distance to the centroid
    cut_note: str


@dataclass
class Pair:
    """A line of removed_paths.txt: the removed sample, the one it duplicates, their similarity as written."""

    removed: str
    duplicate_of: str
    similarity: str


@dataclass
class EpsPairs:
    eps: str  # the %g of eps, as in eps_<e>
    removed: int
    kept: int
    near: list[Pair] = field(default_factory=list)  # nearest the threshold 1 - eps
    sampled: list[Pair] = field(default_factory=list)  # a seeded sample of the rest


def require_file(folder: str, name: str, flag: str, made_by: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UsageError(flag, f"{folder} holds no {name}", f"pass the output folder of a completed {made_by} run")
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@dataclass
class PruneRun:
    folder: str
    params: dict
    stats: list[dict]  # cluster_stats.csv, one dict of strings per cluster
    clusters: list[ClusterFile]


def load_prune_run(folder: str, flag: str = "--prune-dir") -> PruneRun:
    """prune.py's outputs in `folder`, checked, with the sorted cluster files its params.json names."""
    if not os.path.isdir(folder):
        raise UsageError(flag, f"{folder} does not exist", "pass the --save-dir of a completed prune.py run")
    params = load_json(require_file(folder, PARAMS_FILE, flag, "prune.py"))
    stats = read_csv(require_file(folder, PRUNE_STATS_FILE, flag, "prune.py"))
    require_file(folder, KEPT_KEYS_FILE, flag, "prune.py")
    sorted_dir = params.get("sorted_clusters_path") if isinstance(params, dict) else None
    if not sorted_dir or "which_to_keep" not in params:
        raise UsageError(flag, f"{os.path.join(folder, PARAMS_FILE)} is not prune.py's",
                         "pass the --save-dir of a completed prune.py run")
    if not os.path.isdir(sorted_dir):
        raise UsageError(flag, f"its run read the sorted clusters in {sorted_dir}, which no longer exists",
                         "restore that folder (the report shows the members of its clusters)")
    clusters = scan_clusters(sorted_dir, len(stats), flag, flag)
    sizes = [int(row["size"]) for row in stats]
    if sizes != [c.rows for c in clusters]:
        raise UsageError(flag, f"the cluster files in {sorted_dir} changed since the run (their sizes differ from "
                         f"{PRUNE_STATS_FILE})", "rerun prune.py on them, or restore the files it read")
    return PruneRun(folder, params, stats, clusters)


def as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def by_complexity(complexity: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The non-empty clusters (an empty one has nothing to show), least complex first, NaN last."""
    nonempty = np.flatnonzero(sizes > 0)
    return nonempty[np.argsort(complexity[nonempty], kind="stable")]


def choose_clusters(complexity: np.ndarray, sizes: np.ndarray, most: int, seed: int) -> tuple[list[int], int]:
    """The clusters given a page, least complex first: all when they are at most `most`, else the `most` // 4
    least and most complex and a seeded sample of the rest; and how many were left out."""
    ordered = by_complexity(complexity, sizes)
    if len(ordered) <= most:
        return ordered.tolist(), 0
    ends = max(most // 4, 1)
    middle = ordered[ends:len(ordered) - ends]
    drawn = np.random.default_rng(seed).choice(len(middle), size=most - 2 * ends, replace=False)
    chosen = np.concatenate([ordered[:ends], middle[np.sort(drawn)], ordered[len(ordered) - ends:]])
    return chosen.tolist(), len(ordered) - most


def extremes(complexity: np.ndarray, sizes: np.ndarray) -> tuple[list[int], list[int]]:
    """The INDEX_EXTREMES simplest and most complex non-empty clusters (most complex first)."""
    ordered = by_complexity(complexity, sizes)
    count = min(INDEX_EXTREMES, len(ordered) // 2 or len(ordered))
    return ordered[:count].tolist(), ordered[::-1][:count].tolist()


def strip_positions(rows: int, quota: int, which: str, per_strip: int) -> tuple[dict[str, list[range]], str]:
    """Each strip as runs of positions in order of distance to the centroid (0 = nearest), and what the cut
    strip shows. hard keeps the farthest `quota`, so its cut is between positions rows - quota - 1 (the first
    pruned) and rows - quota (the last kept); easy keeps the nearest, cut at quota. `spread` (the index page's
    strip) takes members evenly over the whole range of distances, nearest to farthest."""
    if which == "hard":
        cut, note = rows - quota, "At the cut: the nearest kept members and the farthest pruned ones"
    elif which == "easy":
        cut, note = quota, "At the cut: the farthest kept members and the nearest pruned ones"
    else:
        cut, note = rows // 2, "Around the median distance (--which-to-keep random: no distance cut)"
    start = min(max(cut - per_strip // 2, 0), max(rows - per_strip, 0))
    spread = np.unique(np.linspace(0, rows - 1, min(per_strip, rows)).round().astype(int)) if rows else []
    return {"nearest": [range(0, min(per_strip, rows))],
            "cut": [range(start, min(start + per_strip, rows))],
            "farthest": [range(max(rows - per_strip, 0), rows)],
            "spread": [range(p, p + 1) for p in spread]}, note


def read_members(cluster: ClusterFile, descending: bool, positions: range, kept_keys) -> list[Member]:
    """The members at a run of positions (nearest first), read from the file alone: a descending file holds the
    farthest first."""
    if not positions:
        return []
    first, last = ((cluster.rows - positions.stop, cluster.rows - positions.start) if descending
                   else (positions.start, positions.stop))
    (keys,) = cluster.columns(("key",), first, last)
    utf8 = keys_as_utf8(keys, cluster.path, first)
    members = [Member(str(key), float(d), str(stripped) in kept_keys) for key, d, stripped
               in zip(as_text(utf8), cluster.distances(first, last), as_text(strip_extensions(utf8)))]
    return members[::-1] if descending else members


def cluster_view(run: PruneRun, j: int, per_strip: int, kept_keys) -> ClusterView:
    """Cluster j's strips, read from its file (only those rows), each member marked kept or pruned by
    prune.py's kept_keys.npy."""
    cluster, row = run.clusters[j], run.stats[j]
    strips, note = strip_positions(cluster.rows, int(row["quota"]), run.params["which_to_keep"], per_strip)
    descending = cluster.is_descending()
    views = {name: [m for positions in runs for m in read_members(cluster, descending, positions, kept_keys)]
             for name, runs in strips.items()}
    return ClusterView(j, row, views, note)


def embedding_run(run: PruneRun) -> tuple[dict | None, str | None]:
    """compute_embeddings.py's params.json and failed.txt behind the prune run's clusters, when the embeddings came
    from it (clustering.json names them); (None, None) otherwise."""
    if not (embeddings := pruned_clustering(run).get("embeddings")):
        return None, None
    for folder in (embeddings, os.path.dirname(embeddings)):
        params = os.path.join(folder, PARAMS_FILE)
        if os.path.isfile(params) and "model" in (found := load_json(params)) and "shards" in found:
            failed = os.path.join(folder, FAILED_FILE)
            return found, failed if os.path.isfile(failed) else None
    return None, None


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def clustered_eps(run: PruneRun, folder: str, flag: str = "--dedup-dir") -> str | None:
    """The eps (as in eps_<e>) of the deduplication in `folder` whose kept keys the pruned clusters were made from
    (cluster_embeddings.py --subset, as the clustering.json beside them records), or None where that cannot be
    told: clusters of every row or made elsewhere, or a subset that is not a .npy or is gone (and for a folder that
    is no deduplication's: load_dedup says so). A deduplication none of whose kept keys is that subset is refused:
    the report's funnel would chain the counts of unrelated runs."""
    subset = pruned_clustering(run).get("subset")
    if not (isinstance(subset, str) and subset.endswith(".npy") and os.path.isfile(subset)
            and os.path.isfile(os.path.join(folder, STATS_FILE))):
        return None
    for name in sorted(name for name in os.listdir(folder) if name.startswith("eps_")):
        kept = os.path.join(folder, name, KEPT_KEYS_FILE)
        if os.path.isfile(kept) and filecmp.cmp(kept, subset, shallow=False):
            return name.removeprefix("eps_")
    raise UsageError(flag, f"{folder} did not deduplicate the rows of the pruned clusters: they were clustered from "
                     f"{subset} (as {CLUSTERING_FILE} says), none of its eps_<e>/{KEPT_KEYS_FILE}",
                     "pass the deduplicate.py --save_folder whose kept keys were clustered, or leave --dedup-dir out")


def clustered_every_row(run: PruneRun) -> bool:
    """Whether cluster_embeddings.py made the pruned clusters from every row of its embeddings (no --subset)."""
    record = pruned_clustering(run)
    return bool(record.get("embeddings")) and record.get("subset") is None


def pruned_clustering(run: PruneRun) -> dict:
    """cluster_embeddings.py's clustering.json beside the pruned clusters ({} where there is none)."""
    return clustering_record(run.params["sorted_clusters_path"])[1]


def load_dedup(folder: str, pairs: int, seed: int, flag: str = "--dedup-dir") -> tuple[dict, list[EpsPairs]]:
    """deduplicate.py's params and, per eps of its dedup_stats.csv, the counts and the pairs to show."""
    if not os.path.isdir(folder):
        raise UsageError(flag, f"{folder} does not exist", "pass the --save_folder of a completed deduplicate.py run")
    params = load_json(require_file(folder, PARAMS_FILE, flag, "deduplicate.py"))
    shown = []
    for row in read_csv(require_file(folder, STATS_FILE, flag, "deduplicate.py")):
        eps_dir = eps_folder(float(row["eps"]))
        path = os.path.join(folder, eps_dir, REMOVED_FILE)
        if not os.path.isfile(path):
            raise UsageError(flag, f"{folder} holds no {eps_dir}/{REMOVED_FILE}",
                             "pass the output folder of a completed deduplicate.py run")
        near, sampled = pick_pairs(path, pairs, seed)
        shown.append(EpsPairs(eps_dir.removeprefix("eps_"), int(row["removed"]), int(row["kept"]), near, sampled))
    return params, shown


def parse_pair(line: str, path: str, number: int) -> Pair:
    fields = line.rstrip("\n").split("\t")
    if len(fields) != 3:
        raise UsageError(path, f"line {number + 1} has {len(fields)} tab-separated fields, not 3 (path, duplicated "
                         "path, similarity)", "pass deduplicate.py's own removed_paths.txt")
    return Pair(*fields)


def pick_pairs(path: str, pairs: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """From removed_paths.txt: the pairs // 2 lines of lowest similarity (those nearest the threshold 1 - eps, where
    choosing eps is decided; the earlier line on a tie), then a seeded sample of the other lines, filling `pairs`.
    One pass, a chunk of lines at a time: each line draws a random priority from one seeded stream, and the
    candidates kept are the lowest similarities and the lowest priorities (enough of them that the sample still
    fills when some turn out to be among the nearest)."""
    near_count = pairs // 2
    keep = pairs  # priorities kept: the sample (pairs - near_count) plus those that may be in the near set
    rng = np.random.default_rng(seed)
    near: list[tuple[float, int, str]] = []
    sample: list[tuple[float, int, str]] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for start in itertools.count(0, PAIR_LINES):
            lines = list(itertools.islice(f, PAIR_LINES))
            if not lines:
                break
            similarity = np.array([as_number(parse_pair(line, path, start + i).similarity)
                                   for i, line in enumerate(lines)])
            priority = rng.random(len(lines))
            near = lowest(near, similarity, lines, start, near_count)
            sample = lowest(sample, priority, lines, start, keep)
    near_lines = {number for _, number, _ in near}
    rest = [entry for entry in sample if entry[1] not in near_lines][:pairs - near_count]
    return ([parse_pair(line, path, n) for _, n, line in near],
            [parse_pair(line, path, n) for _, n, line in sorted(rest, key=lambda entry: entry[1])])


def lowest(best: list, values: np.ndarray, lines: list[str], start: int, count: int) -> list:
    """The `count` entries (value, line number, line) of lowest value among `best` and a new chunk (ties: the
    earlier line)."""
    if count <= 0:
        return []
    take = np.argsort(values, kind="stable")[:count]
    merged = best + [(float(values[i]), start + int(i), lines[i]) for i in take]
    return sorted(merged, key=lambda entry: (entry[0], entry[1]))[:count]
