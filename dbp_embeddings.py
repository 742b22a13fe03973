"""From the embeddings researchers hold to SemDeDup's sorted clusters, on one machine, in bounded memory.

The layouts read, found from the files themselves:
  - one .npy (n, dim) of float16/float32 embeddings, with its keys in a .txt (one per line), a 1-D
    string .npy or a .parquet column;
  - clip-retrieval's parts, the layout of LAION's embedding releases: `img_emb/img_emb_<n>.npy` with
    `metadata/metadata_<n>.parquet` (key column `image_path`), paired by <n>, rows by position;
  - DataComp's shards: `<shard>.npz` (the embeddings under `l14_img`) beside `<shard>.parquet` (`uid`).

NeMo Curator 1.x's k-means result (`kmeans_results/centroid=<j>/*.parquet`) is converted without
rerunning k-means. Embeddings are read a chunk at a time and L2-normalised as they are read. k-means is faiss's, as
SemDeDup runs it (spherical, niter 100, seed 1234), trained on a seeded sample; then one streamed
pass assigns every row to its nearest centroid and keeps 8 bytes per row (cluster id, distance);
each cluster's file is then written from those, reading only its own keys. The keys are gathered
once into a text file (one per line) so that a cluster's keys can be read without the others.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dbp_cli import PARTIAL_SUFFIX, UsageError, atomic_open, progress, save_json, save_npy
from dbp_clusters import cluster_table, keys_as_utf8, read_npy_header, save_cluster_file
from dbp_tasks import TaskPool
from dbp_utils import exact_faiss, unit_rows

CHUNK_ROWS = 1 << 16  # embeddings and keys read at a time
TEXT_BLOCK_BYTES = 1 << 20  # of a keys .txt, read at a time
UTF8_BOM = b"\xef\xbb\xbf"  # what some editors put at the start of a UTF-8 text file
WINDOW_BYTES = 64 << 20  # a sample's rows are read through mappings of at most this much of a file
MAX_SEED = 2**31 - 1  # faiss takes its seed as a C int
POINTS_PER_CENTROID = 256  # faiss's own cap on training points per centroid: the default sample size
CLIP_EMBEDDINGS = re.compile(r"(?:img|text)_emb_(\d+)\.npy")
CLIP_METADATA = re.compile(r"metadata_(\d+)\.parquet")
NEMO_PARTITIONS = ("centroid", "nearest_cent")  # kmeans_results/<name>=<j>/*.parquet: NeMo Curator 1.x, Dask-era
NEMO_DISTANCE = "cosine_dist_to_cent"
SORTED_DIR = "sorted_clusters"
CENTROIDS_FILE = "kmeans_centroids.npy"
# Work files, kept in the save folder's staging area until the run is published.
KEYS_FILE = "keys.npy"  # every key, in row order, fixed width
LABELS, DISTANCES = "labels.npy", "distances.npy"  # per row: its cluster, its distance to the centroid
ORDER = "order.npy"  # the rows sorted by cluster (stably: in row order within each)
SUBSET_ROWS = "subset_rows.npy"  # with --subset: the rows clustered, sorted; the work files are about them
ASSIGN_DIR = "assign"  # each range's labels and distances, until all are assigned
ASSIGN_ROWS = 1 << 18  # rows assigned by one task
HASH_OFFSET, HASH_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)  # 64-bit FNV-1a's constants


# ---------------------------------------------------------------------------------------------
# The layouts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One file of embeddings (a .npy, or an array in a .npz) and the file with the keys of its rows."""

    path: str
    rows: int
    dim: int
    dtype: np.dtype
    keys: str | None  # .txt, .npy or .parquet (None where only the embeddings are read)
    key_column: str | None = None  # for .parquet keys
    npz_key: str | None = None  # for .npz embeddings
    offset: int | None = 0  # where the rows start in the file; None: compressed in a .npz, read whole

    def chunks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) for rows [start, stop), CHUNK_ROWS at a time, read (not mapped) so that
        memory stays flat."""
        stop = self.rows if stop is None else stop
        if self.offset is None:
            whole = self._npz_array()
            for first in range(start, stop, CHUNK_ROWS):
                yield first, whole[first:min(first + CHUNK_ROWS, stop)].astype(np.float32)
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dim * self.dtype.itemsize)
            for first in range(start, stop, CHUNK_ROWS):
                count = min(CHUNK_ROWS, stop - first)
                yield first, np.fromfile(f, self.dtype, count * self.dim).reshape(count, self.dim).astype(np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The float32 rows at the given sorted indices, through short-lived mappings of a window at a time."""
        if self.offset is None:
            return self._npz_array()[rows].astype(np.float32)
        out = np.empty((len(rows), self.dim), np.float32)
        row_bytes = self.dim * self.dtype.itemsize
        per_window = max(1, WINDOW_BYTES // row_bytes)
        bounds = np.searchsorted(rows, np.arange(0, self.rows + per_window, per_window))
        for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if a < b:
                first = w * per_window
                window = np.memmap(self.path, self.dtype, "r", self.offset + first * row_bytes,
                                   (min(per_window, self.rows - first), self.dim))
                out[a:b] = window[rows[a:b] - first]
                del window  # unmapped: its pages stop counting as ours
        return out

    def _npz_array(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as npz:
            return npz[self.npz_key]

    def key_chunks(self) -> Iterator[np.ndarray]:
        """The keys of this part's rows as UTF-8 bytes, in chunks."""
        yield from read_keys(self.keys, self.key_column)

    def as_json(self) -> dict:
        return {**self.__dict__, "dtype": self.dtype.str}


@dataclass(frozen=True)
class Embeddings:
    """All parts, in order: row r of the whole is row r - start of the part holding it."""

    parts: list[Part]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    def starts(self) -> np.ndarray:
        return np.cumsum([0] + [p.rows for p in self.parts])

    def unit_rows_at(self, rows: np.ndarray) -> np.ndarray:
        """The rows at sorted indices of the whole, checked and L2-normalised."""
        starts = self.starts()
        bounds = np.searchsorted(rows, starts)
        pieces = []
        for part, start, a, b in zip(self.parts, starts, bounds[:-1], bounds[1:]):
            if a < b:
                local = rows[a:b] - start
                pieces.append(checked_unit(part.take(local), part.path, local))
        return np.concatenate(pieces)

    def files(self) -> list[str]:
        return sorted({p.path for p in self.parts} | {p.keys for p in self.parts if p.keys})

    def save(self, path: str) -> None:
        """The layout found, as JSON: tasks read it from the run's folder instead of carrying it (a folder of
        clip-retrieval or DataComp parts can hold tens of thousands of them)."""
        save_json(path, [part.as_json() for part in self.parts])


@functools.lru_cache(maxsize=1)
def load_embeddings(path: str) -> Embeddings:
    """Embeddings.save's layout, read once per process."""
    with open(path) as f:
        return Embeddings([Part(**{**part, "dtype": np.dtype(part["dtype"])}) for part in json.load(f)])


def find_embeddings(embeddings: str, keys: str | None, key_column: str | None, npz_key: str,
                    with_keys: bool = True) -> Embeddings:
    """Detect the layout of --embeddings (and, `with_keys`, of --keys) and check every part's header."""
    if not os.path.exists(embeddings):
        raise UsageError("--embeddings", f"{embeddings} does not exist", "point it at a .npy file or a folder of parts")
    if os.path.isfile(embeddings):
        if not embeddings.endswith(".npy"):
            raise UsageError("--embeddings", f"{embeddings} is not a .npy file",
                             "pass a .npy of shape (n, dim), or a folder of clip-retrieval or DataComp parts")
        if with_keys and not keys:
            raise UsageError("--keys", "is required with a single .npy of embeddings",
                             "pass the keys as a .txt (one per line), a 1-D string .npy or a .parquet")
        parts = [npy_part(embeddings, keys if with_keys else None, key_column)]
    else:
        names = sorted(os.listdir(embeddings))
        clip = numbered_parts(embeddings, names, CLIP_EMBEDDINGS)
        shards = [name for name in names if name.endswith(".npz")]
        if clip and not shards:
            parts = clip_retrieval_parts(embeddings, clip, keys, key_column or "image_path", with_keys)
        elif shards and not clip:
            if keys:
                raise UsageError("--keys", "is not used with DataComp shards: their keys (uid) are in each "
                                 "<shard>.parquet", "drop --keys")
            parts = [datacomp_part(os.path.join(embeddings, name), npz_key, key_column or "uid", with_keys)
                     for name in shards]
        else:
            what = "both clip-retrieval parts and .npz shards" if clip else "no img_emb_<n>.npy and no .npz files"
            raise UsageError("--embeddings", f"{embeddings} holds {what}",
                             "point it at one .npy, a clip-retrieval img_emb folder or a folder of DataComp shards")
    if sum(part.rows for part in parts) == 0:  # (one part of many may be empty: a shard of failed images)
        raise UsageError(parts[0].path if len(parts) == 1 else embeddings, "holds no rows",
                         "point at the embeddings of your data set")
    for part in parts[1:]:
        if part.dim != parts[0].dim:
            raise UsageError(part.path, f"has dimension {part.dim} but {parts[0].path} has {parts[0].dim}",
                             "all parts must come from the same embedding model")
    return Embeddings(parts)


def npy_part(path: str, keys: str | None, key_column: str | None) -> Part:
    """A .npy of embeddings, and the file of its keys (None: not needed)."""
    shape, dtype, fortran, offset = read_npy_header(path)
    _check_embedding_header(path, shape, dtype, fortran)
    if keys is not None:
        _check_keys_file(keys, shape[0], path, key_column)
    return Part(path, shape[0], shape[1], dtype, keys, key_column if keys else None, offset=offset)


def clip_retrieval_parts(folder: str, parts: dict[int, str], keys: str | None, key_column: str,
                         with_keys: bool = True) -> list[Part]:
    """img_emb_<n>.npy + metadata_<n>.parquet, paired by <n> and ordered by it (0, 1, .., 10: not by name)."""
    if not with_keys:
        return [npy_part(os.path.join(folder, parts[n]), None, None) for n in sorted(parts)]
    metadata = keys or os.path.join(os.path.dirname(os.path.abspath(folder)), "metadata")
    if not os.path.isdir(metadata):
        raise UsageError("--keys", f"{metadata} is not a folder", "pass clip-retrieval's metadata folder")
    tables = numbered_parts(metadata, sorted(os.listdir(metadata)), CLIP_METADATA)
    unpaired = sorted(set(parts) ^ set(tables))
    if unpaired:
        n = unpaired[0]
        missing = f"metadata_{n}.parquet in {metadata}" if n in parts else f"{folder}'s part {n}"
        raise UsageError("--keys", f"part {n} has no partner: no {missing}",
                         "pass the metadata folder written with these embeddings")
    return [npy_part(os.path.join(folder, parts[n]), os.path.join(metadata, tables[n]), key_column)
            for n in sorted(parts)]


def numbered_parts(folder: str, names: list[str], pattern: re.Pattern) -> dict[int, str]:
    """{n: name} of the files named by `pattern` with their part number n; two names for one number (`_0`
    and `_00`) are refused: pairing either one would give the other's rows the wrong keys."""
    parts: dict[int, str] = {}
    for name in names:
        if m := pattern.fullmatch(name):
            if (other := parts.setdefault(int(m[1]), name)) != name:
                raise UsageError(folder, f"holds {other} and {name}, both part {int(m[1])}",
                                 "keep one of them: part numbers must be unique")
    return parts


def datacomp_part(path: str, npz_key: str, key_column: str, with_keys: bool = True) -> Part:
    """<shard>.npz with the embeddings under npz_key, beside <shard>.parquet with the uids."""
    keys = path[: -len(".npz")] + ".parquet"
    try:
        with zipfile.ZipFile(path) as z, z.open(info := z.getinfo(f"{npz_key}.npy")) as f:
            version = np.lib.format.read_magic(f)  # 1.0, or 2.0 and 3.0 (2.0 with a UTF-8 header)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = _stored_offset(path, info) + f.tell() if info.compress_type == zipfile.ZIP_STORED else None
    except KeyError:
        raise UsageError(path, f"holds no array {npz_key!r}",
                         "pass --npz-key with the embedding array's name") from None
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UsageError(path, f"is not a readable .npz file ({e})",
                         "point at DataComp's embedding shards") from None
    _check_embedding_header(path, shape, dtype, fortran)
    if not with_keys:
        return Part(path, shape[0], shape[1], dtype, None, npz_key=npz_key, offset=offset)
    if not os.path.isfile(keys):
        raise UsageError(path, f"has no {os.path.basename(keys)} beside it", "DataComp shards come as .npz + .parquet")
    _check_keys_file(keys, shape[0], path, key_column)
    return Part(path, shape[0], shape[1], dtype, keys, key_column, npz_key=npz_key, offset=offset)


def _stored_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed member's bytes start in its zip file (np.savez stores them as they are, so that
    they can be mapped like a .npy's): after its local header, 30 bytes, its name and its extra field."""
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name, extra = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name + extra


def _check_embedding_header(path: str, shape: tuple, dtype: np.dtype, fortran: bool) -> None:
    if len(shape) != 2 or shape[1] == 0:
        raise UsageError(path, f"has shape {shape}; embeddings are (rows, dim)", "save them as a 2-D array")
    if dtype.kind != "f":
        raise UsageError(path, f"has dtype {dtype}; embeddings are float16 or float32", "save them as floats")
    if fortran:
        raise UsageError(path, "is stored column by column (Fortran order)",
                         "re-save it with np.save(path, np.ascontiguousarray(x))")


def _check_keys_file(keys: str, rows: int, embeddings: str, key_column: str | None) -> None:
    """What can be checked from a keys file's header: that it exists, its kind, and (but for .txt) its length."""
    if os.path.isdir(keys):
        raise UsageError("--keys", f"{keys} is a folder", "pass a keys file (.txt, .npy or .parquet); a folder of "
                         "metadata_<n>.parquet goes with a clip-retrieval img_emb folder")
    if not os.path.isfile(keys):
        raise UsageError("--keys", f"{keys} does not exist", "pass the keys of the embeddings' rows")
    if keys.endswith(".npy"):
        shape, dtype, _, _ = read_npy_header(keys)
        if len(shape) != 1 or dtype.kind not in "US":
            raise UsageError(keys, f"has shape {shape} and dtype {dtype}; keys are a 1-D string array",
                             "save the keys as np.array(list_of_str)")
        count = shape[0]
    elif keys.endswith(".parquet"):
        count = _parquet_file(keys, key_column).metadata.num_rows
    elif keys.endswith(".txt"):
        return  # counted as it is read
    else:
        raise UsageError("--keys", f"{keys} is not a .txt, .npy or .parquet file", "pass the keys in one of those")
    if count != rows:
        raise UsageError(keys, f"holds {count} keys but {embeddings} has {rows} rows",
                         "pass the keys written with these embeddings, in the same order")


def _parquet_file(path: str, column: str | None):
    """A parquet file whose `column` holds keys: text, bytes or integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors share no base class worth naming
        raise UsageError(path, f"is not a readable parquet file ({e})", "point at the metadata parquet") from None
    schema = table.schema_arrow
    if column is None:
        raise UsageError("--key-column", f"is required with parquet keys ({path} has {', '.join(schema.names)})",
                         "pass the column that holds the keys")
    if column not in schema.names:
        raise UsageError(path, f"has no column {column!r} (it has {', '.join(schema.names)})",
                         "pass --key-column with the column that holds the keys")
    kind = schema.field(column).type
    if not any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                       pa.types.is_large_binary, pa.types.is_integer)):
        raise UsageError(path, f"column {column!r} has type {kind}; keys are text (or integer ids)",
                         "pass --key-column with the column that holds the keys")
    return table


def arrow_keys(values, path: str, first_row: int = 0) -> np.ndarray:
    """A pyarrow array of keys (text, UTF-8 bytes or integer ids) as checked UTF-8 bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if values.null_count:
        row = first_row + values.is_null().to_numpy(zero_copy_only=False).argmax()
        raise UsageError(path, f"row {row}: key is missing (null)", "every row needs a key")
    if pa.types.is_integer(values.type):
        values = pc.cast(values, pa.string())  # ids as their decimal text
    raw = values.cast(pa.large_binary())
    keys = np.array(raw.to_pylist(), dtype=bytes) if len(raw) else np.zeros(0, "S1")
    short = np.flatnonzero(np.strings.str_len(keys) != pc.binary_length(raw).to_numpy())  # NULs at the end are lost
    if len(short):
        raise UsageError(path, f"row {first_row + short[0]}: key {raw[short[0]].as_py()!r} ends in a NUL character",
                         "keys are text without NULs; rename the sample")
    return keys_as_utf8(keys, path, first_row)


def read_keys(path: str, column: str | None) -> Iterator[np.ndarray]:
    """The keys in a .txt (one per line), a 1-D string .npy or a parquet column, as UTF-8 bytes, in chunks."""
    if path.endswith(".npy"):
        shape, dtype, _, offset = read_npy_header(path)
        with open(path, "rb") as f:
            f.seek(offset)
            for start in range(0, shape[0], CHUNK_ROWS):
                count = min(CHUNK_ROWS, shape[0] - start)
                yield keys_as_utf8(np.fromfile(f, dtype, count), path, start)
    elif path.endswith(".parquet"):
        start = 0
        for batch in _parquet_file(path, column).iter_batches(batch_size=CHUNK_ROWS, columns=[column]):
            yield arrow_keys(batch.column(0), path, start)
            start += batch.num_rows
    else:
        yield from _text_lines(path)


def _text_lines(path: str) -> Iterator[np.ndarray]:
    """The lines of a text file (without \\n or \\r\\n, nor a UTF-8 byte order mark at its start) as checked
    UTF-8 bytes arrays, a block of the file at a time."""
    rest, row = b"", 0
    with open(path, "rb") as f:
        while block := f.read(TEXT_BLOCK_BYTES):
            data = (rest + block).removeprefix(UTF8_BOM) if row == 0 and not rest else rest + block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                lines = _split_lines(np.frombuffer(data, np.uint8, cut), path, row)
                row += len(lines)
                yield lines
    if rest:
        yield _split_lines(np.frombuffer(rest + b"\n", np.uint8), path, row)


def _split_lines(data: np.ndarray, path: str, first_row: int) -> np.ndarray:
    """Newline-terminated lines as a checked fixed-width bytes array, without a Python loop over them."""
    if (nul := np.flatnonzero(data == 0)).size:  # the fixed-width array would lose a NUL at a line's end
        row = first_row + int((data[:nul[0]] == ord("\n")).sum())
        raise UsageError(path, f"line {row + 1}: key holds a NUL character", "keys are text without NULs")
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts - (data[np.maximum(ends - 1, 0)] == ord("\r")) * (ends > starts)
    width = max(1, int(lengths.max()))
    at = starts[:, None] + np.arange(width)
    chars = np.where(np.arange(width) < lengths[:, None], data[np.minimum(at, len(data) - 1)], 0).astype(np.uint8)
    return keys_as_utf8(np.ascontiguousarray(chars).view(f"S{width}").ravel(), path, first_row)


# ---------------------------------------------------------------------------------------------
# Keys: gathered once, so each cluster reads only its own
# ---------------------------------------------------------------------------------------------


def gather_keys(embeddings: Embeddings, folder: str) -> int:
    """Write every key, in row order, to folder/keys.npy as one fixed-width bytes array (so that a cluster
    reads only its own keys); check each part's key count; return how many keys repeat an earlier one
    (SemDeDup keeps them: a warning). The width is known only at the end: chunks wait in files till then."""
    chunk_files, hashes = [], []
    with progress(len(embeddings.parts), "keys", "part") as bar:
        for part in embeddings.parts:
            count = 0
            for keys in part.key_chunks():
                chunk_files.append(os.path.join(folder, f"keys_{len(chunk_files)}.npy"))
                np.save(chunk_files[-1], keys)
                hashes.append(_hash(keys))
                count += len(keys)
            if count != part.rows:
                raise UsageError(part.keys, f"holds {count} keys but {part.path} has {part.rows} rows",
                                 "pass the keys written with these embeddings, in the same order")
            bar.update()
    widths = [read_npy_header(path)[1].itemsize for path in chunk_files]
    partial = os.path.join(folder, KEYS_FILE + PARTIAL_SUFFIX)
    keys = np.lib.format.open_memmap(partial, "w+", f"S{max(widths, default=1)}", (embeddings.rows,))
    start = 0
    for path in chunk_files:
        chunk = np.load(path)
        keys[start:start + len(chunk)] = chunk
        start += len(chunk)
        os.remove(path)
    keys.flush()
    del keys
    os.replace(partial, os.path.join(folder, KEYS_FILE))
    hashes = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    return int((hashes[1:] == hashes[:-1]).sum())


def _hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each key (FNV-1a's step over 8-byte words), to count repeated keys in 8 bytes a key."""
    width = -(-keys.dtype.itemsize // 8) * 8
    words = np.ascontiguousarray(keys.astype(f"S{width}")).view(np.uint64).reshape(len(keys), width // 8)
    h = np.full(len(keys), HASH_OFFSET)
    with np.errstate(over="ignore"):
        for column in words.T:
            h = (h ^ column) * HASH_PRIME
    return h


def _is_pickle(path: str) -> bool:
    """A file written by pickle (protocol 2 and later begin with the PROTO opcode), not .npy nor text."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


@functools.lru_cache(maxsize=4)
def _mapped(path: str) -> np.ndarray:
    """A work file mapped once per process: a cluster's rows are spread over the whole file, and mapping it
    afresh for each cluster would fault most of its pages in again every time."""
    return np.load(path, mmap_mode="r")


def subset_rows(work: str, subset: str) -> tuple[int, int]:
    """Write work/SUBSET_ROWS: the rows whose key (extension stripped) is in the `subset` file (a kept_keys.npy,
    or a text file of paths or keys). Returns (rows selected, subset keys not among the rows' keys)."""
    from dbp_utils import strip_extensions

    if _is_pickle(subset):  # prune.py's kept_keys_trie.pkl: its keys are the stripped keys
        from dbp_utils import load_trie

        trie = load_trie(subset)
        wanted = np.array([key.encode("utf-8") for key in trie.keys()] or [b""])[:len(trie)]
    elif subset.endswith(".npy"):
        shape, dtype, _, _ = read_npy_header(subset)
        if len(shape) != 1 or dtype.kind not in "US":
            raise UsageError("--subset", f"{subset} has shape {shape} and dtype {dtype}; expected 1-D keys",
                             "pass a kept_keys.npy from deduplicate.py or prune.py, or a text file of paths")
        wanted = keys_as_utf8(np.load(subset), subset)
    else:
        wanted = np.concatenate([np.zeros(0, "S1"), *_text_lines(subset)])
    wanted = np.unique(strip_extensions(wanted)) if len(wanted) else wanted
    keys = _mapped(os.path.join(work, KEYS_FILE))
    found, selected = np.zeros(len(wanted), bool), []
    for first in range(0, len(keys), CHUNK_ROWS):
        stripped = strip_extensions(np.asarray(keys[first:first + CHUNK_ROWS]))
        at = np.minimum(np.searchsorted(wanted, stripped), max(len(wanted) - 1, 0))
        hit = (wanted[at] == stripped) if len(wanted) else np.zeros(len(stripped), bool)
        found[at[hit]] = True
        selected.append(first + np.flatnonzero(hit))
    save_npy(os.path.join(work, SUBSET_ROWS), np.concatenate(selected).astype(np.int64))
    return sum(len(s) for s in selected), int((~found).sum())


# ---------------------------------------------------------------------------------------------
# k-means and the assignment
# ---------------------------------------------------------------------------------------------


def checked_unit(x: np.ndarray, path: str, rows: np.ndarray) -> np.ndarray:
    """float32 rows (a copy of ours) L2-normalised in place, refusing non-finite and all-zero rows (named by
    their row in the file at `path`)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a norm past float32's range is handled below
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.isfinite(norms).all() and norms.all():  # the usual case: every row finite and non-zero
        x /= norms
        return x
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise UsageError(path, f"row {rows[bad[0]]}: embedding is not finite (NaN or infinity)",
                         "recompute or drop that row")
    zero = np.flatnonzero(~x.any(axis=1))
    if len(zero):
        raise UsageError(path, f"row {rows[zero[0]]}: embedding is all zeros",
                         "a zero embedding has no direction; drop that row")
    return unit_rows(x.astype(np.float64)).astype(np.float32)  # norms past float32's range: scaled first


def train_kmeans(embeddings: Embeddings, k: int, niter: int, seed: int, sample_size: int, spherical: bool,
                 threads: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """faiss.Kmeans on a seeded uniform sample of the rows (of the `subset` rows, when given): (centroids float32
    (k, dim), final objective)."""
    count = embeddings.rows if subset is None else len(subset)
    rows = np.sort(np.random.default_rng(seed).choice(count, size=sample_size, replace=False))
    x = embeddings.unit_rows_at(rows if subset is None else subset[rows])
    faiss = exact_faiss(threads)
    # Every sampled row is used (faiss would subsample past 256 per centroid), and faiss's warning about
    # few points per centroid, printed straight to stderr, is left to our own checks.
    kmeans = faiss.Kmeans(embeddings.dim, k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                          max_points_per_centroid=-(-sample_size // k), min_points_per_centroid=1)
    kmeans.train(x)
    return kmeans.centroids, float(kmeans.obj[-1])


ASSIGNED = np.dtype([("label", "<i4"), ("distance", "<f4")])  # a row's nearest centroid and its distance to it


def assign(embeddings: Embeddings, centroids_file: str, spherical: bool, work: str, pool: TaskPool,
           subset: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row's (or every `subset` row's) nearest centroid and its cosine distance to it: (labels, distances).
    One task per range of ASSIGN_ROWS rows of a part writes ASSIGN_DIR/<part>_<first row>.npy; a rerun does
    only the missing ones."""
    folder = os.path.join(work, ASSIGN_DIR)
    os.makedirs(folder, exist_ok=True)
    starts = embeddings.starts()
    ranges = [(i, first, min(first + ASSIGN_ROWS, part.rows)) for i, part in enumerate(embeddings.parts)
              for first in range(0, part.rows, ASSIGN_ROWS)]
    files = [os.path.join(folder, f"{i}_{first}.npy") for i, first, _ in ranges]
    tasks = [(embeddings.parts[i], first, stop, centroids_file, spherical, path, subset, int(starts[i]))
             for (i, first, stop), path in zip(ranges, files) if not os.path.exists(path)]
    for _ in pool.run(assign_rows, tasks, "assign", unit="range"):
        pass
    assigned = np.concatenate([np.load(path) for path in files])
    return assigned["label"], assigned["distance"]


def assign_rows(task: tuple[Part, int, int, str, bool, str, str | None, int]) -> None:
    """One range of a part's rows (those in the `subset` file only, when given; `start` is the part's first row
    in the whole): each row's nearest centroid (faiss, by inner product for spherical k-means, else by L2)
    and 1 - its cosine to that centroid, computed in float64 per row so that it is the same on any machine
    and for any thread count; written to `path`."""
    part, first, stop, centroids_file, spherical, path, subset, start = task
    centroids = np.load(centroids_file)
    faiss = exact_faiss(1)  # the tasks are the parallelism
    index = faiss.IndexFlatIP(part.dim) if spherical else faiss.IndexFlatL2(part.dim)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    directions = unit_rows(centroids.astype(np.float64))
    if subset is None:
        chunks = part.chunks(first, stop)
    else:
        selected = _mapped(subset)
        local = selected[np.searchsorted(selected, start + first):np.searchsorted(selected, start + stop)] - start
        chunks = ((local[a], part.take(local[a:a + CHUNK_ROWS])) for a in range(0, len(local), CHUNK_ROWS))
    pieces = []
    for row, x in chunks:
        x = checked_unit(x, part.path, np.arange(row, row + len(x)))
        _, nearest = index.search(x, 1)
        piece = np.empty(len(x), ASSIGNED)
        piece["label"] = nearest[:, 0]
        piece["distance"] = 1 - np.einsum("ij,ij->i", x.astype(np.float64), directions[nearest[:, 0]])
        pieces.append(piece)
    with atomic_open(path) as f:
        np.save(f, np.concatenate(pieces) if pieces else np.empty(0, ASSIGNED))


# ---------------------------------------------------------------------------------------------
# Writing the sorted clusters
# ---------------------------------------------------------------------------------------------


def write_clusters(folder: str, work: str, labels: np.ndarray, k: int, descending: bool, pool: TaskPool) -> None:
    """SORTED/cluster_{j}.npy for every cluster not written yet (a rerun finishes a killed run). Each task
    reads its cluster's rows from the work files: the rows in cluster order, their distances and keys."""
    os.makedirs(folder, exist_ok=True)
    order = os.path.join(work, ORDER)
    if not os.path.exists(order):
        save_npy(order, np.argsort(labels, kind="stable"))  # each cluster's rows, in row order
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
    todo = [j for j in range(k) if not os.path.exists(os.path.join(folder, f"cluster_{j}.npy"))]
    tasks = ((os.path.join(folder, f"cluster_{j}.npy"), work, j, int(bounds[j]), int(bounds[j + 1]), descending)
             for j in todo)
    for _ in pool.run(write_cluster, tasks, "write", total=len(todo)):
        pass
    _mapped.cache_clear()  # unmapped, when this process wrote them


def write_cluster(task: tuple[str, str, int, int, int, bool]) -> None:
    """One cluster's file, from the rows [start, stop) of the work files' cluster order (positions among the
    subset's rows, when the work folder holds a subset)."""
    path, work, j, start, stop, descending = task
    positions = np.array(_mapped(os.path.join(work, ORDER))[start:stop])
    distances = _mapped(os.path.join(work, DISTANCES))[positions]
    subset = os.path.join(work, SUBSET_ROWS)
    rows = np.array(_mapped(subset)[positions]) if os.path.exists(subset) else positions
    keys = _mapped(os.path.join(work, KEYS_FILE))[rows]
    save_cluster_file(path, cluster_table(keys, rows, distances, j, descending))


# ---------------------------------------------------------------------------------------------
# NeMo Curator's k-means results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NemoCluster:
    """One cluster of NeMo Curator 1.x's k-means result: the parquet files of its `centroid=<j>` folder."""

    j: int
    files: tuple[str, ...]
    rows: int
    first_row: int  # its rows are numbered from here in column 1 (NeMo's output has no embedding index)


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
        paths = tuple(sorted(files.get(j, ())))
        clusters.append(NemoCluster(j, paths, sum(counts.get(j, ())), first))
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


def convert_nemo_cluster(task: tuple) -> np.ndarray | None:
    """Write one NeMo Curator cluster as SemDeDup's cluster file; return the L2-normalised mean of its
    normalised embeddings when asked for (the centroid when none was saved), else None."""
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
        return None
    return total / np.linalg.norm(total) if total.any() else total


def _embedding_matrix(column, path: str) -> np.ndarray:
    """A parquet list column of embeddings as float32 (n, dim); float16 comes as uint16 bit patterns."""
    import pyarrow as pa

    column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise UsageError(path, f"embedding column has type {column.type}, not a list", "pass --embedding-column")
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise UsageError(path, f"embeddings of different lengths ({lengths.min()} to {lengths.max()})",
                         "every embedding must have the same dimension")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.dtype == np.uint16:  # float16 stored as its bit pattern
        values = values.view(np.float16)
    if values.dtype.kind != "f":
        raise UsageError(path, f"embedding values have dtype {values.dtype}", "embeddings are floats")
    return values.astype(np.float32).reshape(len(lengths), -1)


def _finite(values: np.ndarray, path: str) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise UsageError(path, f"row {bad[0]}: {NEMO_DISTANCE} is {values[bad[0]]}", "rerun NeMo Curator's k-means")
    return values
