"""prune.py's selection: each cluster's kept members, as tasks, and the kept keys of all clusters gathered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dbpkit.clusters import CHUNK_ROWS, ClusterFile, names_cluster, parse_distances
from dbpkit.files import append_rest, write_npy
from dbpkit.keys import as_lines, keys_as_utf8, strip_extensions

if TYPE_CHECKING:
    from dbpkit.tasks import TaskPool

MIN_PIECE_KEYS = 1 << 16  # kept keys sorted by one thread at least (fewer: not worth a thread)


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
        write_npy(f, np.sort(strip_extensions(paths)))  # the keys, sorted here, in parallel
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
        append_rest(f, lines_to)
    os.remove(path)
    return keys


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

    def sorted_unique(self, threads: int = 1) -> np.ndarray:
        """kept_keys.npy: sorted, each key once. numpy's sort lets go of the GIL, so `threads` threads each sort
        a piece first; the last sort then only merges the pieces (timsort, in place, merges sorted runs)."""
        keys = self.keys[:self.count]
        pieces = np.array_split(keys, max(1, min(threads, len(keys) // MIN_PIECE_KEYS)))
        if len(pieces) > 1:
            from concurrent.futures import ThreadPoolExecutor  # here: the loader API (dbp_utils) imports this module

            with ThreadPoolExecutor(len(pieces) - 1) as helpers:
                sorting = [helpers.submit(piece.sort, kind="stable") for piece in pieces[1:]]
                pieces[0].sort(kind="stable")
                for piece in sorting:
                    piece.result()
        keys.sort(kind="stable")
        repeats = keys[1:] == keys[:-1]
        return keys[np.concatenate(([True], ~repeats))] if repeats.any() else keys
