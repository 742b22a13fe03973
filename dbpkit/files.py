"""Files written whole or not at all, read back safely, and fingerprinted by their content.

Light on purpose (the standard library and numpy): the loader API imports it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dbpkit.errors import UsageError

PARTIAL_SUFFIX = ".partial"  # a single output file until it is complete
PARAMS_FILE, LOG_FILE = "params.json", "logs.log"  # every run's record (written last: it marks the run done), log
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 12  # pages of a file hashed for its fingerprint
# Rows by index (benchmarks/bench_read.py measures both ways, from the page cache and from disk): a read costs about
# the same wherever its run lies, and from disk all of a call's reads are asked for at once; a mapping costs more to
# set up, then a page fault per 64 KB of the file it touches (the kernel maps that much around a fault, reading it
# from disk one fault at a time), shared by the runs within it.
WINDOW_BYTES = 64 << 20  # rows are mapped at most this much of a file at a time
# Runs this far apart on average are read. Mapping them is faster from the page cache (by milliseconds per 8,000
# rows: 1.1x to 5x in runs of the benchmark), but from disk, as embeddings larger than RAM are read, 3x slower
# (tenths of a second).
SPARSE_BYTES = 32 << 10
FEW_RUNS = 32  # this few runs are read: a mapping costs about as much as this many reads
GATHER_ROWS = 1 << 13  # rows gathered at a time in their files' dtype, to convert (float16, dim 1024: 16 MB)
WILL_NEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # (no posix_fadvise on macOS: the rows are read as asked)
CUT_SHORT = "ends before the rows its header promises (it changed during the run)"
REWRITE = "rewrite the file, or point at the one the run was started on"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs: Any) -> Iterator[Any]:
    """Write to `.<name>.partial` beside `path`, renamed into place only once complete (kwargs: open's)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, tmp):  # a failed write (a full disk) names no file, or the partial one
            e.filename = path
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_json(path: str, value: Any) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def write_csv(path: str, columns: dict[str, np.ndarray]) -> None:
    """Named columns as a CSV table, a row per entry; floats as repr: exact."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(columns)
        rows.writerows(zip(*(column.tolist() for column in columns.values())))


def load_json(path: str) -> Any:
    """The value in a JSON file, or None if there is none (or it is not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path: str) -> str:
    """A text file's content, or "" if there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def file_fingerprint(path: str) -> str:
    """What a rerun must find unchanged in an input to reuse work made from it: its path, inode and ctime (a
    copy that keeps size and mtime, as `cp -p`, `rsync -a` or a restored backup make, has a new inode or
    ctime; so has a file rewritten in place), its size, and a hash of FINGERPRINT_BLOCKS blocks spread over
    its content and its tail (for file systems whose ctime cannot be trusted)."""
    info = os.stat(path)
    digest = hashlib.sha256(f"{os.path.abspath(path)}\0{info.st_size}\0{info.st_ino}\0{info.st_ctime_ns}".encode())
    with open(path, "rb") as f:
        step = max(FINGERPRINT_BLOCK, info.st_size // FINGERPRINT_BLOCKS)
        for offset in range(0, max(info.st_size, 1), step):
            f.seek(offset)
            digest.update(f.read(FINGERPRINT_BLOCK))
        f.seek(max(info.st_size - FINGERPRINT_BLOCK, 0))
        digest.update(f.read())  # the tail: an appended or truncated end
    return digest.hexdigest()


def files_fingerprint(paths: list[str]) -> str:
    """One digest of many input files' fingerprints (params.json holds this, not one entry per file)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_fingerprint(path).encode())
    return "sha256:" + digest.hexdigest()


class NewFolders:
    """`path` and its missing parents, created; `remove_created()` removes what was created again, so that a
    failed run leaves the tree as it found it."""

    def __init__(self, path: str):
        self.created, existing = None, os.path.abspath(path)
        while not os.path.exists(existing):
            self.created, existing = existing, os.path.dirname(existing)
        os.makedirs(path, exist_ok=True)

    def remove_created(self) -> None:
        if self.created:
            shutil.rmtree(self.created, ignore_errors=True)


def write_npy(f: Any, array: Any) -> None:
    """np.save into the open binary file `f`, checked to have reached it whole. numpy writes an array through a C
    stream of its own and does not look at whether closing that stream wrote what was left in its buffer: on a
    full disk a small array (under the stream's few kilobytes) comes out cut short, with no error."""
    np.save(f, array)
    f.flush()
    written, end = os.fstat(f.fileno()).st_size, f.tell()
    if written < end:
        raise OSError(errno.EIO, f"a write stopped short ({written} of {end} bytes written)", f.name)


def save_npy(path: str, array: Any) -> None:
    """np.save, atomically and checked (write_npy), creating the folders it needs (and removing them again if it
    fails)."""
    folders = NewFolders(os.path.dirname(os.path.abspath(path)))
    try:
        with atomic_open(path) as f:
            write_npy(f, array)
    except BaseException:
        folders.remove_created()
        raise


def append_rest(source: Any, out: Any) -> None:
    """The rest of the open file `source` appended to the open file `out`: copied by the kernel where it can
    (os.copy_file_range: Linux), else by shutil through a buffer (macOS, or a file system that refuses it)."""
    out.flush()
    start, size = source.tell(), os.fstat(source.fileno()).st_size
    if hasattr(os, "copy_file_range"):
        try:
            while start < size:
                start += os.copy_file_range(source.fileno(), out.fileno(), size - start, start)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    source.seek(start)
    shutil.copyfileobj(source, out)
    out.flush()


def read_rows(path: str, offset: int, dtype: np.dtype, shape: tuple[int, int], rows: np.ndarray,
              out: np.ndarray) -> None:
    """Rows `rows` (sorted) of the array of `shape` and `dtype` at `offset` in the file, into `out` (converted).
    A few runs of consecutive rows (a cluster's share of one of LAION's parts) or runs far apart are read a run at a
    time, straight into place, all of them asked of the disk first; many runs close together (a dense sample)
    through short-lived mappings of a window of the file at a time, where one page fault brings in several of them."""
    if not len(rows):
        return
    raw = out if dtype == out.dtype and out.flags.c_contiguous else np.empty(out.shape, dtype)
    if _read_runs([path], [offset], np.array([0, shape[0]]), rows, raw):  # (mapping suits them better)
        with open(path, "rb", buffering=0) as f:
            _map_windows(f, path, offset, dtype, shape, rows, out)
    elif raw is not out:
        out[:] = raw


def reading_suits(runs: int, span: int, row_bytes: int) -> bool:
    """Whether reading `runs` runs of rows within `span` rows costs less than mapping them (the constants above say
    why)."""
    return runs <= FEW_RUNS or span * row_bytes / runs >= SPARSE_BYTES  # (bytes from one run to the next)


def ask_ahead(f, starts: list[int], lengths: list[int]) -> None:
    """Tell the kernel every range of the file about to be read (byte offsets and lengths), before the first
    is read: from a disk (embeddings larger than the page cache, as LAION's are) they then arrive in one batch of
    requests instead of one wait each. A range already in the page cache costs a system call. Only a hint: where
    the system has none, or refuses it, the rows are read as asked."""
    if WILL_NEED is None:
        return
    try:
        for start, length in zip(starts, lengths):
            os.posix_fadvise(f.fileno(), start, length, WILL_NEED)
    except OSError:
        pass


def _read_into(f, path: str, starts: list[int], at: list[int], lengths: list[int], buffer: memoryview) -> None:
    """Bytes starts[k] .. + lengths[k] of the file into buffer[at[k]:], a read each, all of them asked for first."""
    ask_ahead(f, starts, lengths)
    for start, a, length in zip(starts, at, lengths):
        read_exactly(f, start, buffer[a:a + length], path)


def read_rows_of_parts(parts: Sequence[Any], starts: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """Rows `rows` (sorted) of a whole made of `parts`, row r of it row r - starts[i] of part i, into `out`
    (converted). Each part is a file of rows with a path, a dtype, the byte offset of its rows (None: not a plain
    array) and take(rows, out), as read_rows reads them. Where the parts hold one dtype, every run of consecutive rows
    within a part is found in one pass over all the rows, and each part's share that reading suits is read run by
    run (the others left to its take): a cluster has a few rows in each of LAION's thousands of parts, where numpy's
    calls for each part would cost more than its reads."""
    if len({part.dtype for part in parts}) > 1:  # (mixed files: each part converts its own rows)
        for i, a, b in shares(starts, rows):
            parts[i].take(rows[a:b] - starts[i], out=out[a:b])
        return
    paths, offsets, dtype = [part.path for part in parts], [part.offset for part in parts], parts[0].dtype
    in_place = dtype == out.dtype and out.flags.c_contiguous  # else gathered in the files' dtype, then converted
    step = max(1, len(rows)) if in_place else GATHER_ROWS
    for c0 in range(0, len(rows), step):
        chunk, into = rows[c0:c0 + step], out[c0:c0 + step]
        raw = into if in_place else np.empty(into.shape, dtype)
        for i, a, b in _read_runs(paths, offsets, starts, chunk, raw):  # the shares not read
            parts[i].take(chunk[a:b] - starts[i], out=raw[a:b])
        if raw is not into:
            into[:] = raw


def shares(starts: np.ndarray, rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(part, first, end) of each part's share rows[first:end] of the sorted rows, for the parts that have one."""
    bounds = np.searchsorted(rows, starts).tolist()
    return [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if a < b]


def _read_runs(paths: list[str], offsets: list[int | None], starts: np.ndarray, rows: np.ndarray,
               raw: np.ndarray) -> list[tuple[int, int, int]]:
    """Rows `rows` (sorted) of a whole made of files, row r of it row r - starts[i] of file i (whose rows begin
    offsets[i] bytes in; None: not a plain array), into `raw` (C-contiguous, of the files' dtype): each file's share
    that reading suits (reading_suits), a read a run, all of its runs asked for first (4096 rows 64 KB apart in a
    file not in the page cache: 0.03 s instead of 0.3 s, benchmarks/bench_read.py --cold). Every run is found in one
    pass over all the rows. Returns the other shares, (file, first, end), for the caller to read."""
    row_bytes, count = raw.strides[0], len(rows)
    bounds = np.searchsorted(rows, starts)
    starts_run = np.ones(count, bool)
    starts_run[1:] = np.diff(rows) != 1
    starts_run[bounds[(bounds > 0) & (bounds < count)]] = True  # a part's first row starts a run of its own
    firsts = np.flatnonzero(starts_run)
    part = np.searchsorted(starts, rows[firsts], side="right") - 1
    offset = np.array([-1 if o is None else o for o in offsets], np.int64)[part]
    byte_starts = (offset + (rows[firsts] - starts[part]) * row_bytes).tolist()
    lengths = ((np.append(firsts[1:], count) - firsts) * row_bytes).tolist()
    at = (firsts * row_bytes).tolist()
    runs = np.searchsorted(firsts, bounds).tolist()  # part i's runs: runs[i]:runs[i + 1]
    low, high = rows[np.minimum(bounds[:-1], count - 1)].tolist(), rows[np.maximum(bounds[1:] - 1, 0)].tolist()
    buffer, left = memoryview(raw.reshape(-1).view(np.uint8)), []
    for i, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if a == b:
            continue
        r0, r1 = runs[i], runs[i + 1]
        if offsets[i] is None or not reading_suits(r1 - r0, high[i] - low[i] + 1, row_bytes):
            left.append((i, a, b))
            continue
        with open(paths[i], "rb", buffering=0) as f:
            _read_into(f, paths[i], byte_starts[r0:r1], at[r0:r1], lengths[r0:r1], buffer)
    return left


def _map_windows(f, path: str, offset: int, dtype: np.dtype, shape: tuple[int, int], rows: np.ndarray,
                 out: np.ndarray) -> None:
    """Each window of the file that holds rows mapped in turn. (Not asked for ahead: the kernel reads around each
    page fault, and asking for each run, or each window's span, cost more than it saved on the benchmark.)"""
    row_bytes = shape[1] * dtype.itemsize
    per_window = max(1, WINDOW_BYTES // row_bytes)
    bounds = np.searchsorted(rows, np.arange(0, shape[0] + per_window, per_window))
    for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a < b:
            first = w * per_window
            count = min(per_window, shape[0] - first)
            try:
                window = np.memmap(f, dtype, "r", offset + first * row_bytes, (count, shape[1]))
            except ValueError:  # the mapping would reach past the end of the file
                raise UsageError(path, CUT_SHORT, REWRITE) from None
            out[a:b] = window[rows[a:b] - first]
            del window  # unmapped: its pages stop counting as ours


def read_exactly(f, offset: int, buffer: memoryview, path: str) -> None:
    """Fill `buffer` from `offset` of the raw file f (a read may return less than asked: past 2 GB, or at the
    end of a file cut short since its header was read)."""
    f.seek(offset)
    while buffer:
        got = f.readinto(buffer)
        if not got:
            raise UsageError(path, CUT_SHORT, REWRITE)
        buffer = buffer[got:]


def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file, refusing pickles and truncation: what
    np.load(mmap_mode="r") finds out from the header (the mapping itself is dropped unread)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except IsADirectoryError:
        raise UsageError(path, "is a folder, not a .npy file", "point at a .npy file") from None
    except EOFError:  # (what numpy raises for an empty file)
        raise UsageError(path, "is empty, not a .npy file", "point at a file written by np.save") from None
    except ValueError as e:
        what = ("holds Python objects (a pickled .npy), which is never loaded" if "Python objects" in str(e) else
                "is not a .npy file" if "pickled" in str(e) else
                "is truncated: shorter than its header says" if "greater than file size" in str(e) else
                f"is not a readable .npy file ({e})")
        raise UsageError(path, what, "point at files written by np.save of a plain numeric or string array") from None
    except OSError as e:
        raise UsageError(path, f"cannot be read: {e.strerror or e}",
                         "check that it exists and its permissions") from None
    if not isinstance(array, np.memmap):  # a .npz under a .npy name
        raise UsageError(path, "is not a .npy file (it is a zip of arrays, an .npz)",
                         "point at files written by np.save")
    fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
    return array.shape, array.dtype, fortran, array.offset
