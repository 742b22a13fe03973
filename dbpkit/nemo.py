"""NeMo Curator's k-means results (1.x: `kmeans_results/centroid=<j>/*.parquet`; Dask-era `nearest_cent=<j>`),
converted to SemDeDup's sorted clusters without rerunning k-means.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from dbpkit.clusters import cluster_table, save_cluster_file
from dbpkit.errors import UsageError
from dbpkit.keys import arrow_keys, key_hashes, repeat_in_files, repeated_key
from dbpkit.layouts import checked_unit

NEMO_PARTITIONS = ("centroid", "nearest_cent")  # kmeans_results/<name>=<j>/*.parquet: NeMo Curator 1.x, Dask-era
NEMO_DISTANCE = "cosine_dist_to_cent"


@dataclass(frozen=True)
class NemoCluster:
    """One cluster of NeMo Curator 1.x's k-means result: the parquet files of its `centroid=<j>` folder."""

    j: int
    files: tuple[str, ...]
    file_rows: tuple[int, ...]  # the rows of each file
    first_row: int  # its rows are numbered from here in column 1 (NeMo's output has no embedding index)

    @property
    def rows(self) -> int:
        return sum(self.file_rows)


def find_nemo_clusters(results: str, k: int | None, k_source: str, id_column: str, embedding_column: str,
                       need_embeddings: bool) -> list[NemoCluster]:
    """The clusters of a Hive-partitioned `kmeans_results/centroid=<j>/*.parquet` folder (`nearest_cent=<j>`
    in the Dask-era NeMo Curator), found by pyarrow.dataset and checked from the parquet footers; a missing
    or row-less partition is an empty cluster. `k_source` says where a given k comes from, for errors."""
    import pyarrow.dataset as ds

    if not os.path.isdir(results):
        what = "is a file, not a folder" if os.path.exists(results) else "does not exist"
        raise UsageError("--from-nemo-curator", f"{results} {what}",
                         "point it at NeMo Curator's kmeans_results folder")
    try:
        fragments = list(ds.dataset(results, format="parquet", partitioning="hive").get_fragments())
    except Exception as e:  # pyarrow's errors share no base class worth naming
        raise UsageError("--from-nemo-curator", f"{results} cannot be read as parquet partitions ({e})",
                         "point it at NeMo Curator's kmeans_results folder") from None
    files: dict[int, list[str]] = {}
    folder_of: dict[int, str] = {}
    for fragment in fragments:
        folder = os.path.dirname(fragment.path)
        keys = ds.get_partition_keys(fragment.partition_expression)
        field = next((f for f in NEMO_PARTITIONS if f in keys), None)
        if field is None or len(keys) != 1:
            raise UsageError(fragment.path, "is not in a centroid=<j> folder",
                             "point --from-nemo-curator at NeMo Curator's kmeans_results folder")
        j = keys[field]  # an int, or text when another folder's name is not one
        if isinstance(j, str) and j.isascii() and j.isdecimal():
            j = int(j)
        if not isinstance(j, int) or j < 0:
            raise UsageError(folder, f"names cluster {j!r}, which is not a number 0, 1, 2, ...",
                             "remove the folder, or point at NeMo Curator's own output")
        if folder_of.setdefault(j, folder) != folder:
            raise UsageError(folder, f"and {folder_of[j]} both name cluster {j}",
                             "keep one of them (NeMo Curator writes one folder per cluster)")
        files.setdefault(j, []).append(fragment.path)
    if not files:
        raise UsageError("--from-nemo-curator", f"{results} holds no centroid=<j> folders of parquet files",
                         "point it at NeMo Curator's kmeans_results folder")
    if k is not None and max(files) >= k:
        raise UsageError(folder_of[max(files)], f"names cluster {max(files)}, but {k_source}",
                         "point at the results and centroids of one k-means run")
    counts = {j: [_nemo_file_rows(path, id_column, embedding_column if need_embeddings else None)
                  for path in sorted(paths)] for j, paths in files.items()}
    rows = sum(sum(c) for c in counts.values())
    k = max(files) + 1 if k is None else k
    if k > rows:
        raise UsageError(folder_of[max(files)], f"makes k = {k} clusters of only {rows} rows",
                         "k-means has at most one cluster per row: remove the stray folder, or pass --num_clusters")
    clusters, first = [], 0
    for j in range(k):
        clusters.append(NemoCluster(j, tuple(sorted(files.get(j, ()))), tuple(counts.get(j, ())), first))
        first += clusters[-1].rows
    return clusters


def _nemo_file_rows(path: str, id_column: str, embedding_column: str | None) -> int:
    """The rows of one of NeMo Curator's parquet files, after checking its columns' names and types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema, count = pq.read_schema(path), pq.read_metadata(path).num_rows
    except Exception as e:  # pyarrow's errors share no base class worth naming
        raise UsageError(path, f"is not a readable parquet file ({e})", "rerun NeMo Curator's k-means") from None
    for column, flag, fits, what in (
            (id_column, "--id-column", _is_key_type, "text or integer ids"),
            (NEMO_DISTANCE, None, pa.types.is_floating, "floating-point distances"),
            (embedding_column, "--embedding-column", _is_vector_type, "lists of floats")):
        if column is None:
            continue
        if column not in schema.names:
            fix = f"pass {flag} with the right name" if flag else "point at NeMo Curator's k-means output"
            raise UsageError(path, f"has no column {column!r} (it has {', '.join(schema.names)})", fix)
        if count and not fits(schema.field(column).type):  # (an empty file's columns may have no type)
            raise UsageError(path, f"column {column!r} has type {schema.field(column).type}, not {what}",
                             f"pass {flag} with the right column" if flag else "point at NeMo Curator's output")
    return count


def _is_key_type(kind) -> bool:
    import pyarrow as pa

    return any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                       pa.types.is_large_binary, pa.types.is_integer))


def _is_vector_type(kind) -> bool:
    import pyarrow as pa

    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return is_list and (pa.types.is_floating(kind.value_type) or kind.value_type == pa.uint16())


def convert_nemo_cluster(task: tuple) -> tuple[np.ndarray | None, np.ndarray]:
    """Write one NeMo Curator cluster as SemDeDup's cluster file; return the L2-normalised mean of its
    normalised embeddings when asked for (the centroid when none was saved), else None; and its ids' hashes
    (key_hashes), in the order of its files' rows."""
    cluster, path, id_column, embedding_column, descending, mean_wanted = task
    import pyarrow.parquet as pq

    keys, distances, total, dim = [], [], None, None
    for file in cluster.files:
        columns = [id_column, NEMO_DISTANCE] + ([embedding_column] if mean_wanted else [])
        table = pq.read_table(file, columns=columns)
        if table.num_rows == 0:  # an empty file's columns may not even have their types
            continue
        keys.append(arrow_keys(table.column(id_column).combine_chunks(), file))  # integer ids too, as text
        distances.append(_finite(table.column(NEMO_DISTANCE).to_numpy().astype(np.float32), file))
        if mean_wanted:
            x = _embedding_matrix(table.column(embedding_column), file)
            if dim is not None and x.shape[1] != dim:
                raise UsageError(file, f"holds embeddings of dimension {x.shape[1]}, {cluster.files[0]} of {dim}",
                                 "every embedding must have the same dimension")
            dim = x.shape[1]
            unit = checked_unit(x, file, np.arange(len(x)))
            total = unit.sum(axis=0, dtype=np.float64) + (0 if total is None else total)
    width = max([1] + [k.dtype.itemsize for k in keys])
    keys = np.concatenate([k.astype(f"S{width}") for k in keys]) if keys else np.zeros(0, "S1")
    distances = np.concatenate(distances) if distances else np.zeros(0, np.float32)
    rows = np.arange(cluster.first_row, cluster.first_row + len(keys))
    save_cluster_file(path, cluster_table(keys, rows, distances, cluster.j, descending))
    if total is None:
        return None, key_hashes(keys)
    return (total / np.linalg.norm(total) if total.any() else total), key_hashes(keys)


def check_unique_ids(clusters: list[NemoCluster], hashes: np.ndarray, id_column: str) -> None:
    """Refuse an id that two rows hold, in one cluster or in two (deduplicate.py refuses the first, and the kept
    keys, a set, would count the second once), naming both rows by their parquet file; `hashes` are the ids'
    hashes of every cluster's files in turn."""
    paths = [path for cluster in clusters for path in cluster.files]
    starts = np.cumsum([0] + [rows for cluster in clusters for rows in cluster.file_rows])
    ids = _IdsByRow(paths, starts, id_column)
    if (repeat := repeated_key(ids, hashes)) is not None:
        raise repeat_in_files(paths, starts, "id", ids[repeat[1]], repeat,
                              "each id must name one sample (the kept keys and the loaders' filter go by it): drop "
                              "the repeated row, or pass --id-column with a column of unique ids",
                              "the same sample in two files, or ids that restart in every file")


class _IdsByRow:
    """The ids of parquet files read one after the other, by row of the whole: read a file at a time, as rows
    with a repeated hash ask for them (rarely more than a few)."""

    def __init__(self, paths: list[str], starts: np.ndarray, id_column: str):
        self.paths, self.starts, self.id_column = paths, starts, id_column
        self._ids = functools.lru_cache(maxsize=4)(self._read)  # (the rows of a repeat alternate between files)

    def __getitem__(self, row: int) -> bytes:
        i = int(np.searchsorted(self.starts, row, "right")) - 1
        return self._ids(self.paths[i])[row - self.starts[i]]

    def _read(self, path: str) -> np.ndarray:
        import pyarrow.parquet as pq

        return arrow_keys(pq.read_table(path, columns=[self.id_column]).column(self.id_column).combine_chunks(), path)


def _embedding_matrix(column, path: str) -> np.ndarray:
    """A parquet list column of embeddings (of floats or uint16: its type was checked with the file's schema) as
    float32 (n, dim); float16 comes as uint16 bit patterns."""
    column = column.combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise UsageError(path, f"embeddings of different lengths ({lengths.min()} to {lengths.max()})",
                         "every embedding must have the same dimension")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.dtype == np.uint16:  # float16 stored as its bit pattern
        values = values.view(np.float16)
    return values.astype(np.float32).reshape(len(lengths), -1)


def _finite(values: np.ndarray, path: str) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise UsageError(path, f"row {bad[0]}: {NEMO_DISTANCE} is {values[bad[0]]}", "rerun NeMo Curator's k-means")
    return values
