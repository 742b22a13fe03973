"""The embedding layouts researchers hold, read as they are, and the keys of their rows.

Found from the files themselves:
  - one .npy (n, dim) of float16/float32 embeddings, with its keys in a .txt (one per line), a 1-D
    string .npy or a .parquet column;
  - clip-retrieval's parts, the layout of LAION's embedding releases: `img_emb/img_emb_<n>.npy` with
    `metadata/metadata_<n>.parquet` (key column `image_path`), paired by <n>, rows by position;
  - DataComp's shards: `<shard>.npz` (the embeddings under `l14_img`) beside `<shard>.parquet` (`uid`).
Embeddings are read a chunk at a time and L2-normalised as they are read. The keys are gathered once
into a fixed-width keys.npy so that a cluster's keys can be read without the others; --subset picks rows
by key.
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

from dbpkit.errors import UsageError, not_a_file
from dbpkit.files import PARTIAL_SUFFIX, read_npy_header, read_rows, read_rows_of_parts, save_json, save_npy, shares
from dbpkit.keys import (
    _parquet_file,
    _text_lines,
    key_hashes,
    keys_as_utf8,
    read_keys,
    repeat_in_files,
    repeated_key,
    strip_extensions,
)
from dbpkit.trie import load_trie

CHUNK_ROWS = 1 << 16  # embeddings and keys read at a time
CLIP_EMBEDDINGS = re.compile(r"(?:img|text)_emb_(\d+)\.npy")
CLIP_METADATA = re.compile(r"metadata_(\d+)\.parquet")
# Work files, kept in the save folder's staging area until the run is published.
KEYS_FILE = "keys.npy"  # every key, in row order, fixed width
SUBSET_ROWS = "subset_rows.npy"  # with --subset: the rows clustered, sorted; the work files are about them


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

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 rows at the given sorted indices, into `out` if given (as files.read_rows reads them)."""
        out = np.empty((len(rows), self.dim), np.float32) if out is None else out
        if self.offset is None:
            out[:] = self._npz_array()[rows]
        else:
            read_rows(self.path, self.offset, self.dtype, (self.rows, self.dim), rows, out)
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
        """The rows at sorted indices of the whole, checked and L2-normalised: read part by part, normalised in
        one pass (a cluster of LAION's has a few rows in each of thousands of parts)."""
        starts = self.starts()
        x = np.empty((len(rows), self.dim), np.float32)
        read_rows_of_parts(self.parts, starts, rows, x)
        if unit_in_place(x):
            return x
        return np.concatenate([checked_unit(x[a:b], self.parts[i].path, rows[a:b] - starts[i])  # (the culprit named)
                               for i, a, b in shares(starts, rows)])

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
    if not os.path.isfile(embeddings) and not os.path.isdir(embeddings):
        raise UsageError("--embeddings", f"{embeddings} {not_a_file(embeddings)}",
                         "point it at a .npy file or a folder of parts")
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
        raise UsageError("--keys", f"{keys} {not_a_file(keys)}", "pass the keys of the embeddings' rows")
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


def gather_keys(embeddings: Embeddings, folder: str) -> None:
    """Write every key, in row order, to folder/keys.npy as one fixed-width bytes array (so that a cluster
    reads only its own keys), checking each part's key count and refusing a key that two rows hold: the kept
    keys and the loaders' filter go by key, and SemDeDup's deduplication asserts that no key repeats in a
    cluster. The width is known only at the end: chunks wait in files till then."""
    from dbpkit.cli import progress  # (here: the loader API reads this module and wants no progress bars)

    chunk_files, hashes = [], []
    with progress(len(embeddings.parts), "keys", "part") as bar:
        for part in embeddings.parts:
            count = 0
            for keys in part.key_chunks():
                chunk_files.append(os.path.join(folder, f"keys_{len(chunk_files)}.npy"))
                save_npy(chunk_files[-1], keys)
                hashes.append(key_hashes(keys))
                count += len(keys)
            if count != part.rows:
                raise UsageError(part.keys, f"holds {count} keys but {part.path} has {part.rows} rows",
                                 "pass the keys written with these embeddings, in the same order")
            bar.update()
    dtype = np.dtype(f"S{max((read_npy_header(path)[1].itemsize for path in chunk_files), default=1)}")
    partial = os.path.join(folder, KEYS_FILE + PARTIAL_SUFFIX)
    with open(partial, "wb") as f:  # written in turn, not through a mapping, where a full disk would be a SIGBUS
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": (embeddings.rows,)})
        for path in chunk_files:
            f.write(np.load(path).astype(dtype).tobytes())
            os.remove(path)
    keys = np.load(partial, mmap_mode="r")
    repeat = repeated_key(keys, np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
    error = None if repeat is None else repeated_error(embeddings, keys[repeat[1]], repeat)
    del keys
    if error is not None:
        os.remove(partial)
        raise error
    os.replace(partial, os.path.join(folder, KEYS_FILE))


def repeated_error(embeddings: Embeddings, key: bytes, rows: tuple[int, int]) -> UsageError:
    """The error for a key that two rows hold, each named by its key file and its row there."""
    fix = "each key must name one sample (the kept keys and the loaders' filter go by key): drop the repeated row " \
        "or make the keys unique"
    return repeat_in_files([part.keys for part in embeddings.parts], embeddings.starts(), "key", key, rows, fix,
                           "keys that restart in every shard: write them <shard>/<key>, as the loaders' filter then "
                           "matches them")


def _is_pickle(path: str) -> bool:
    """A file written by pickle (protocol 2 and later begin with the PROTO opcode), not .npy nor text."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


@functools.lru_cache(maxsize=4)
def _mapped(path: str) -> np.ndarray:
    """A work file mapped once per process: a cluster's rows are spread over the whole file, and mapping it
    afresh for each cluster would fault most of its pages in again every time."""
    return np.load(path, mmap_mode="r")


def check_subset(subset: str) -> None:
    """A --subset .npy that holds no 1-D keys (another step's array, d_intra say) is refused from its header: at
    the start of a run, not after its keys are gathered (minutes at LAION's size)."""
    if subset.endswith(".npy") and not _is_pickle(subset):
        shape, dtype, _, _ = read_npy_header(subset)
        if len(shape) != 1 or dtype.kind not in "US":
            raise UsageError("--subset", f"{subset} has shape {shape} and dtype {dtype}; expected 1-D keys",
                             "pass a kept_keys.npy from deduplicate.py or prune.py, or a text file of paths")


def subset_rows(work: str, subset: str) -> tuple[int, int]:
    """Write work/SUBSET_ROWS: the rows whose key (extension stripped) is in the `subset` file: a kept_keys.npy
    or kept_keys_trie.pkl, which hold keys (stripped already: stripping `x/y.tar` again would make it `x/y`,
    another sample's key), or a text file of paths, stripped here. Returns (rows selected, subset keys not
    among the rows' keys)."""
    check_subset(subset)
    if _is_pickle(subset):  # prune.py's kept_keys_trie.pkl
        trie = load_trie(subset)
        wanted = np.array([key.encode("utf-8") for key in trie.keys()] or [b""])[:len(trie)]
    elif subset.endswith(".npy"):
        wanted = keys_as_utf8(np.load(subset), subset)
    else:
        wanted = np.concatenate([np.zeros(0, "S1"), *_text_lines(subset)])
        wanted = strip_extensions(wanted) if len(wanted) else wanted
    wanted = np.unique(wanted)
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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, without overflow or underflow for any finite, non-zero row."""
    x = x / np.abs(x).max(axis=1, keepdims=True)  # the largest entry becomes 1: the norm is in [1, sqrt(dim)]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def unit_in_place(x: np.ndarray) -> bool:
    """L2-normalise float32 rows in place if every row is finite and non-zero (the usual case); else leave them."""
    with np.errstate(over="ignore", invalid="ignore"):  # a norm past float32's range: not the usual case
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.isfinite(norms).all() and norms.all():
        x /= norms
        return True
    return False


def checked_unit(x: np.ndarray, path: str, rows: np.ndarray) -> np.ndarray:
    """float32 rows (a copy of ours) L2-normalised in place, refusing non-finite and all-zero rows (named by
    their row in the file at `path`)."""
    if unit_in_place(x):
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
