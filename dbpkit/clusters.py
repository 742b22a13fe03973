"""SemDeDup's sorted-cluster files: finding, validating and reading them, and the other inputs.

SemDeDup's `sort_clusters.py` writes one file per k-means cluster j, `SORTED/cluster_{j}.npy`:
`np.save` of a list of (key, row index, distance to centroid, cluster id) tuples, a string array
of shape (n_j, 4) (`<U..`, or `|S..` for bytes keys), sorted by distance; an empty cluster is
`np.save(path, [])`, a float64 (0,). NeMo Curator 0.4-0.7 wrote the same files with three columns
(id, distance, cluster id); both are read. The centroids, float32 (k, dim), are `kmeans_centroids.npy`
in SemDeDup's save folder, the parent of SORTED. Everything here reads .npy headers first and
then only the rows and columns a step needs, so no cluster is ever held in memory whole.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dbpkit.errors import UsageError
from dbpkit.files import atomic_open, load_json, read_npy_header, save_json, save_npy, write_npy
from dbpkit.keys import as_text, ascii_bytes

# Where the columns DBP reads are, by the number of columns: SemDeDup's 4, NeMo Curator 0.4-0.7's 3.
COLUMNS = {4: {"key": 0, "index": 1, "distance": 2, "cluster": 3}, 3: {"key": 0, "distance": 1, "cluster": 2}}
CLUSTER_FILE = re.compile(r"cluster_(0|[1-9][0-9]*)\.npy")
CENTROIDS_FILE = "kmeans_centroids.npy"
CHUNK_ROWS = 1 << 15  # rows read at a time (~16 MB), so a 560K-row cluster never sits in memory whole
NAMES_SHOWN = 5  # cluster files named in an error about gaps
SIDECAR_SUFFIX = ".dbp.json"  # beside d_intra / d_inter .npy files: what they hold
ARROW_MIN_VALUES = 64  # shorter columns are parsed by numpy: Arrow's four calls cost more than they save there
PARSER_MODULES = ("pyarrow.compute",)  # what the parsers import: for the workers of tasks that parse columns


@dataclass(frozen=True)
class ClusterFile:
    """One sorted cluster file, known from its .npy header alone."""

    path: str
    rows: int
    dtype: np.dtype | None = None  # str ('U') or bytes ('S'); None for an empty cluster
    offset: int = 0
    fortran: bool = False
    width: int = 4  # columns: 4 (SemDeDup) or 3 (NeMo Curator 0.4-0.7)

    def columns(self, names: tuple[str, ...], start: int, stop: int) -> list[np.ndarray]:
        """The named columns ("key", "distance", "cluster") of rows [start, stop), copied out of a mapping of
        just those rows: the kernel hands over page-cache pages without a copy, and unmapping them again keeps
        resident memory flat (a mapping of the whole file kept open would count every page read)."""
        cols = [COLUMNS[self.width][name] for name in names]
        if stop <= start:
            return [np.zeros(0, self.dtype) for _ in cols]
        if self.fortran:  # column-major: each column is contiguous
            data = np.memmap(self.path, self.dtype, "r", self.offset, (self.rows, self.width), "F")
            return [np.array(data[start:stop, c]) for c in cols]
        try:
            rows = np.memmap(self.path, self.dtype, "r", self.offset + start * self.width * self.dtype.itemsize,
                             (stop - start, self.width))
        except FileNotFoundError:  # gone since the run looked, or on Ray not on this node's storage: said so
            raise
        except (OSError, ValueError) as e:
            raise UsageError(self.path, f"cannot be read ({e})", "the file changed or is damaged; rewrite it") from None
        values = [rows[:, c].copy() for c in cols]
        del rows  # unmapped now: a cluster read a chunk at a time never stays resident in this process
        return values

    def chunks(self, names: tuple[str, ...], start: int = 0, stop: int | None = None) -> Iterator[tuple[int, list]]:
        """(first row, named columns) for rows [start, stop), CHUNK_ROWS at a time."""
        stop = self.rows if stop is None else stop
        for first in range(start, stop, CHUNK_ROWS):
            yield first, self.columns(names, first, min(first + CHUNK_ROWS, stop))

    def distances(self, start: int, stop: int) -> np.ndarray:
        """The distances of rows [start, stop) as float64, checked."""
        (values,) = self.columns(("distance",), start, stop)
        return parse_distances(values, self.path, start)

    def is_descending(self) -> bool:
        """Sort direction, from the first and last distance (SemDeDup writes either)."""
        return self.rows == 0 or bool(self.distances(0, 1)[0] >= self.distances(self.rows - 1, self.rows)[0])


def read_cluster_header(path: str) -> ClusterFile:
    """Validate a cluster file's header: an (n, 4) or (n, 3) str/bytes array, or the (0,) of an empty cluster."""
    shape, dtype, fortran, offset = read_npy_header(path)
    if shape == (0,) or (len(shape) == 2 and shape[0] == 0):
        return ClusterFile(path, 0)
    if len(shape) != 2:
        raise UsageError(path, f"has shape {shape}; a cluster file is 2-D (rows, 4)",
                         "point at SemDeDup's sorted clusters")
    if shape[1] not in COLUMNS:
        raise UsageError(path, f"has {shape[1]} columns; expected 4 (path, index, distance, cluster id) or, from "
                         "NeMo Curator, 3 (id, distance, cluster id)", "point at SemDeDup's sorted clusters")
    if dtype.kind not in "US":
        raise UsageError(path, f"has dtype {dtype}; expected a string array",
                         "save each cluster as np.save of a list of (path, index, distance, cluster) tuples")
    return ClusterFile(path, shape[0], dtype, offset, fortran, shape[1])


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
    extra = sorted(j for j in ids if j >= expected)
    missing_count = expected - (len(ids) - len(extra))  # counted, never listed: k may be absurdly large
    if missing_count or extra:
        gaps = []
        if missing_count:
            gaps.append("missing " + _name_list(_first_missing(ids, expected, NAMES_SHOWN), missing_count))
        if extra:
            gaps.append("unexpected " + _name_list(extra[:NAMES_SHOWN], len(extra)))
        claim = f"{k_flag} is {k}" if k is not None else f"the highest file is cluster_{max(ids)}.npy"
        raise UsageError(folder_flag, f"{claim} but {folder} holds {len(ids)} cluster files ({'; '.join(gaps)})",
                         f"cluster files must be exactly cluster_0..cluster_{expected - 1}; fix the folder or {k_flag}")
    return [os.path.join(folder, f"cluster_{j}.npy") for j in range(expected)]


def _first_missing(ids: set[int], expected: int, most: int) -> list[int]:
    """The smallest `most` numbers below `expected` not in `ids`, found in O(len(ids) + most) steps."""
    found, j = [], 0
    while len(found) < most and j < expected:
        if j not in ids:
            found.append(j)
        j += 1
    return found


def _name_list(ids: list[int], total: int) -> str:
    names = ", ".join(f"cluster_{j}.npy" for j in ids)
    return names + (f" and {total - len(ids)} more" if total > len(ids) else "")


def scan_clusters(folder: str | None, k: int | None, folder_flag: str, k_flag: str) -> list[ClusterFile]:
    """Find and validate every cluster file from its header (no rows are read)."""
    return [read_cluster_header(p) for p in find_cluster_files(folder, k, folder_flag, k_flag)]


def parse_distances(values: np.ndarray, path: str, first_row: int = 0) -> np.ndarray:
    """Distance strings -> float64, refusing text, NaN and infinity with the row named."""
    try:
        d = parse_floats(values if values.dtype.kind == "S" else ascii_bytes(values))
    except (ValueError, UnicodeError):
        d = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            try:
                d[i] = float(v)
            except (ValueError, UnicodeError):
                text = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                raise UsageError(path, f"row {first_row + i}: distance {text!r} is not a number",
                                 "the distance column must hold the distance to the centroid") from None
    bad = np.flatnonzero(~np.isfinite(d))
    if len(bad):
        raise UsageError(path, f"row {first_row + bad[0]}: distance is {d[bad[0]]}",
                         "the distance column must hold finite distances to the centroid")
    return d


def parse_floats(text: np.ndarray) -> np.ndarray:
    """Decimal strings (fixed-width bytes) -> float64 exactly as float() reads them, or ValueError.

    Arrow's parser rounds correctly, as Python's does, so both give the same bits; on a distance column's
    plain decimals it is 4x faster than numpy's cast, which calls Python's parser string by string. What
    Arrow refuses (spaces, underscores, a NUL inside a value, bytes that are not UTF-8) numpy's cast decides."""
    return _parse(text, np.float64)


def parse_row_numbers(text: np.ndarray) -> np.ndarray:
    """Row numbers written as text (fixed-width str or bytes) -> int64 as numpy's cast reads them, or
    ValueError / OverflowError. Columns of plain digits only (all of them, as SemDeDup writes them) go through
    Arrow's parser, 3x faster; anything else (a sign, a space, a value past int64) numpy's cast decides."""
    return _parse(text, np.int64, digits_only=True)


def _parse(text: np.ndarray, dtype: type, digits_only: bool = False) -> np.ndarray:
    """numpy's cast of fixed-width text to `dtype`, by Arrow where Arrow reads the same values (and, with
    `digits_only`, where every value is plain digits); numpy's own cast for the rest, and for short columns."""
    if len(text) < ARROW_MIN_VALUES:
        return text.astype(dtype)
    import pyarrow as pa  # here: dbp_utils imports this module, and only cluster columns need Arrow
    import pyarrow.compute as pc

    try:
        strings = _arrow_strings(text if text.dtype.kind == "S" else ascii_bytes(text))
        if not digits_only or pc.all(pc.ascii_is_decimal(strings)).as_py():
            return _from_arrow(pc.cast(strings, pa.from_numpy_dtype(dtype)), dtype)
    except (pa.ArrowException, UnicodeError):
        pass
    return text.astype(dtype)


def _arrow_strings(text: np.ndarray) -> Any:
    """Fixed-width bytes as an Arrow string array, each ending at its trailing NULs as numpy's do (a NUL before
    other bytes stays, and no parser accepts it). Handed over as a buffer: Arrow's numpy conversions would
    import pandas."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = np.ascontiguousarray(text)
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(text.dtype.itemsize), len(text),
                                                 [None, pa.py_buffer(text)])
    return pc.utf8_rtrim(fixed.cast(pa.string()), characters="\0")


def _from_arrow(values: Any, dtype: type) -> np.ndarray:
    """An Arrow array of fixed-width numbers (no nulls) as a numpy array of its own."""
    return np.frombuffer(values.buffers()[1], dtype, len(values), values.offset * np.dtype(dtype).itemsize).copy()


def names_cluster(ids: np.ndarray, cluster_id: int) -> bool:
    """Whether every entry of a cluster-id column says `cluster_id` (written as `7`, or `7.0`)."""
    as_text = str(cluster_id).encode() if ids.dtype.kind == "S" else str(cluster_id)
    if (ids == as_text).all():
        return True
    try:
        return bool((ids.astype(np.float64) == cluster_id).all())
    except ValueError:
        return False


def cluster_table(keys: np.ndarray, rows: np.ndarray, distances: np.ndarray, cluster_id: int,
                  descending: bool) -> np.ndarray:
    """One cluster's file content as SemDeDup writes it: (key, row index, distance, cluster id) rows as a
    `<U` (n, 4) array sorted by distance (farthest first when `descending`), ties in row order."""
    order = np.argsort(-distances if descending else distances, kind="stable")
    keys, rows = as_text(keys[order]), rows[order]
    distances = distances[order].astype(str)  # float32: the shortest text that reads back as the same value
    longest = [np.strings.str_len(keys).max(initial=1), len(str(rows.max(initial=0))),
               np.strings.str_len(distances).max(initial=1), len(str(cluster_id))]
    table = np.empty((len(rows), 4), f"U{max(longest)}")  # as wide as the longest entry, as np.save of tuples
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = keys, rows, distances, str(cluster_id)
    return table


def save_cluster_file(path: str, table: np.ndarray) -> None:
    """Write a cluster file atomically; an empty cluster is `np.save(path, [])`, as SemDeDup writes it."""
    with atomic_open(path) as f:
        write_npy(f, table if len(table) else np.array([]))


def find_centroids(sorted_dir: str, required: bool = True) -> str | None:
    """kmeans_centroids.npy in the sorted-clusters folder or SemDeDup's save folder above it (above the
    folder as given, then above its real location when it is a symbolic link); None if there is none and
    it is not `required`."""
    above = (os.path.dirname(os.path.abspath(sorted_dir)), os.path.dirname(os.path.realpath(sorted_dir)))
    for folder in dict.fromkeys((sorted_dir, *above)):
        if os.path.isfile(path := os.path.join(folder, CENTROIDS_FILE)):
            return path
    if not required:
        return None
    raise UsageError("--centroids_file", f"not given, and no {CENTROIDS_FILE} in {sorted_dir} or its parent",
                     "pass --centroids_file")


def load_centroids(path: str, k: int | None, dim: int | None, flag: str,
                   empty: np.ndarray | None = None) -> np.ndarray:
    """k-means centroids as float64 (k, dim), checked: finite, and none all zeros. Where `empty` marks an
    empty cluster, an all-NaN row (a centroid no member defines) is taken as it is."""
    shape, dtype, _, _ = read_npy_header(path)
    if len(shape) != 2:
        raise UsageError(path, f"has shape {shape}; centroids are a 2-D (k, dim) array",
                         f"point {flag} at SemDeDup's kmeans_centroids.npy")
    if shape[0] == 0 or shape[1] == 0:
        raise UsageError(path, f"has shape {shape}: no centroids", f"point {flag} at the centroids of a k-means run")
    if dtype.kind not in "fiu":
        raise UsageError(path, f"has dtype {dtype}; centroids are numbers", f"point {flag} at kmeans_centroids.npy")
    if k is not None and shape[0] != k:
        raise UsageError(path, f"holds {shape[0]} centroids but there are {k} clusters",
                         "use the centroids of the same k-means run")
    if dim is not None and shape[1] != dim:
        raise UsageError("--dim", f"is {dim} but {path} has dimension {shape[1]}",
                         "omit --dim or pass the centroids' dimension")
    c = np.load(path, allow_pickle=False).astype(np.float64)
    undefined = np.isnan(c).all(axis=1) & (empty if empty is not None else False)
    bad = np.flatnonzero(~np.isfinite(c).all(axis=1) & ~undefined)
    if len(bad):
        raise UsageError(path, f"row {bad[0]}: centroid is not finite", "use the centroids of a converged k-means run")
    zero = np.flatnonzero(~c.any(axis=1) & ~undefined)
    if len(zero):
        raise UsageError(path, f"row {zero[0]}: centroid is all zeros",
                         "a zero centroid has no direction; rerun k-means")
    return c


def save_scores(path: str, values: np.ndarray, holds: str, sorted_dir: str | None, sizes: np.ndarray | None) -> None:
    """A d_intra or d_inter array as a plain float32 .npy (what upstream code reads), and beside it a small
    sidecar saying what it holds and, where it was made from cluster files, their sizes' digest: so that prune
    can refuse the two swapped, or made from another clustering (another k-means run, of the same k)."""
    save_npy(path, values)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    save_json(path + SIDECAR_SUFFIX, {"holds": holds, "clusters": len(values), "sha256": digest,
                                      "sorted_clusters": sorted_dir and os.path.abspath(sorted_dir),
                                      "cluster_sizes": None if sizes is None else sizes_digest(sizes)})


def sizes_digest(sizes: np.ndarray) -> str:
    """A digest of the clusters' sizes, in cluster order: two k-means runs practically never give the same."""
    return "sha256:" + hashlib.sha256(np.asarray(sizes, "<i8").tobytes()).hexdigest()


def scores_sidecar(path: str) -> dict | None:
    """What a scores file's sidecar says it holds, if it has one and it describes this very file."""
    sidecar = load_json(path + SIDECAR_SUFFIX)
    if not isinstance(sidecar, dict):
        return None
    with open(path, "rb") as f:
        return sidecar if hashlib.sha256(f.read()).hexdigest() == sidecar.get("sha256") else None


def load_cluster_scores(path: str, sizes: np.ndarray, flag: str, holds: str, fix: str) -> np.ndarray:
    """A d_intra or d_inter file for clusters of `sizes`: float (k,), NaN allowed (empty clusters), infinity not;
    refused if its sidecar says it holds the other one, or was made from clusters of other sizes (`fix`: how to
    make it again)."""
    k = len(sizes)
    shape, dtype, _, _ = read_npy_header(path)
    sidecar = scores_sidecar(path) or {}
    said = sidecar.get("holds", holds)
    if said != holds:
        raise UsageError(flag, f"{path} holds {said}, not {holds}", "the two score files are swapped: pass the "
                         "d_intra file to --avg_distance_to_cent_save_path and d_inter to "
                         "--mean_centroid_distances_save_path")
    if dtype.kind != "f":
        raise UsageError(flag, f"{path} has dtype {dtype}; expected floats",
                         "pass the file written by the matching compute_*.py script")
    if shape != (k,):
        raise UsageError(flag, f"{path} has shape {shape} but there are {k} clusters",
                         "recompute it on the same sorted clusters")
    if sidecar.get("cluster_sizes") not in (None, sizes_digest(sizes)):
        raise UsageError(flag, f"{path} was computed from other clusters ({sidecar.get('sorted_clusters')}, as they "
                         f"were then): their sizes differ from those of the {k} clusters given", fix)
    values = np.load(path, allow_pickle=False).astype(np.float64)
    if np.isinf(values).any():
        raise UsageError(flag, f"{path}: entry {np.flatnonzero(np.isinf(values))[0]} is infinite",
                         "recompute it on the same sorted clusters")
    return values
