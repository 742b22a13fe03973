"""Keys: a sample's path or id as the cluster files, the key files and the loaders hold it, and its codecs.

Keys arrive as text or bytes from many files (cluster files, .txt, .npy, parquet); here they become UTF-8
bytes (refusing what cannot round-trip), lose their extension, go to text and to DataComp's uid form,
all in numpy without a loop in Python.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import numpy as np

from dbpkit.errors import UsageError
from dbpkit.files import read_npy_header

KEY_CHUNK_ROWS = 1 << 16  # keys read at a time
HASH_OFFSET, HASH_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)  # 64-bit FNV-1a's constants
REPEAT_BATCH = 1024  # repeated hashes whose rows are looked for in one pass over all the hashes
# What no key may hold: the key files have one key a line (kept_paths.txt; a reader's universal newlines also end
# a line at a carriage return) or tab-separated fields (removed_paths.txt, failed.txt), and the fixed-width arrays
# that hold keys end a key at its first NUL. Refused where keys are read, failed samples where they are made.
BAD_KEY_CHARACTERS = {"\t": "a tab", "\n": "a newline", "\r": "a carriage return", "\0": "a NUL"}


def ascii_bytes(text: np.ndarray) -> np.ndarray:
    """A str array as bytes, if it is all ASCII (raises UnicodeError otherwise)."""
    points = np.ascontiguousarray(text).view("<u4")
    if (points >= 128).any():
        raise UnicodeError("not ASCII")
    return points.astype(np.uint8).view(f"S{max(1, text.dtype.itemsize // 4)}").reshape(text.shape)


def keys_as_utf8(keys: np.ndarray, path: str, first_row: int = 0) -> np.ndarray:
    """Keys (str or bytes) as UTF-8 bytes, refusing a key that is not valid UTF-8 (bytes) or Unicode (str), and
    a key holding a character of BAD_KEY_CHARACTERS."""
    if keys.dtype.kind == "S":
        utf8 = np.ascontiguousarray(keys)
        chars = byte_matrix(utf8)
        for row in _rows_where(chars >= 128):  # only keys that are not ASCII need decoding
            try:
                utf8[row].decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(path, f"row {first_row + row}: key {utf8[row].item()!r} is not UTF-8 ({e.reason})",
                                 "write the keys as UTF-8") from None
    else:
        try:
            utf8 = ascii_bytes(keys)  # the usual case, and far faster than encoding
        except UnicodeError:
            try:
                utf8 = np.strings.encode(keys, "utf-8")
            except UnicodeEncodeError:
                row = next(i for i, key in enumerate(keys.tolist()) if not _encodable(key))
                raise UsageError(path, f"row {first_row + row}: key {keys[row].item()!r} is not valid Unicode (a lone "
                                 "surrogate, as from a file name that is not UTF-8)",
                                 "write the keys as UTF-8 text or bytes") from None
        chars = byte_matrix(utf8)
    if (bad := _first_bad_key(chars)) is not None:
        row, what = bad
        text = chars[row].tobytes().rstrip(b"\0").decode("utf-8", "replace")
        raise UsageError(path, f"row {first_row + row}: key {text!r} holds {what}",
                         "key files hold one key a line (kept_paths.txt) or tab-separated fields (removed_paths.txt), "
                         "without NULs; rename the sample")
    return utf8


def key_hashes(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each key (FNV-1a's step over 8-byte words): repeated keys are found in 8 bytes a key."""
    width = -(-keys.dtype.itemsize // 8) * 8
    words = np.ascontiguousarray(keys.astype(f"S{width}")).view(np.uint64).reshape(len(keys), width // 8)
    h = np.full(len(keys), HASH_OFFSET)
    with np.errstate(over="ignore"):
        for column in words.T:
            h = (h ^ column) * HASH_PRIME
    return h


def repeated_key(keys: np.ndarray, hashes: np.ndarray) -> tuple[int, int] | None:
    """Two rows holding the same key (the earlier first), or None if no key repeats. Rows whose hashes (key_hashes)
    are equal are compared by their keys, for a batch of repeated hashes at a time: a data set listed twice, every
    key repeated, costs no more memory than one repeat."""
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    for batch in range(0, len(repeated), REPEAT_BATCH):
        values = repeated[batch:batch + REPEAT_BATCH]
        rows = np.concatenate([start + np.flatnonzero(np.isin(hashes[start:start + KEY_CHUNK_ROWS], values))
                               for start in range(0, len(hashes), KEY_CHUNK_ROWS)])
        earlier: dict[int, list[int]] = {}
        for row, value in zip(rows.tolist(), hashes[rows].tolist()):  # (in row order)
            if (other := next((o for o in earlier.get(value, []) if keys[o] == keys[row]), None)) is not None:
                return other, row
            earlier.setdefault(value, []).append(row)
    return None


def repeat_in_files(paths: list[str], starts: np.ndarray, what: str, key: bytes, rows: tuple[int, int], fix: str,
                    across: str) -> UsageError:
    """The error for a key that two rows of files read one after the other hold (file i's rows start at row
    starts[i] of the whole), each row named by its file and its row there; `across` is added to the fix when
    the two rows are in different files."""
    (i, a), (j, b) = [(int(np.searchsorted(starts, row, "right")) - 1, row) for row in rows]
    elsewhere = "" if i == j else f" of {paths[i]}"
    return UsageError(paths[j], f"row {b - starts[j]}: {what} {key.decode('utf-8', 'replace')!r} is also the {what} "
                      f"of row {a - starts[i]}{elsewhere}", fix + (f" ({across})" if i != j else ""))


def byte_matrix(strings: np.ndarray) -> np.ndarray:
    """A fixed-width bytes array as an (n, width) uint8 matrix, zero-padded on the right."""
    return np.ascontiguousarray(strings).view(np.uint8).reshape(len(strings), strings.dtype.itemsize)


def _rows_where(hit: np.ndarray) -> np.ndarray:
    """The rows of a boolean matrix holding a True (the whole matrix is looked at first: nearly always none)."""
    return np.flatnonzero(hit.any(axis=1)) if hit.any() else np.zeros(0, np.intp)


def _first_bad_key(chars: np.ndarray) -> tuple[int, str] | None:
    """(row, what) of the first key of a fixed-width bytes matrix holding a character of BAD_KEY_CHARACTERS (a NUL
    only before another byte: the trailing ones are the array's padding), or None."""
    found = [(int(rows[0]), what) for character, what in BAD_KEY_CHARACTERS.items()
             if len(rows := _inner_nul(chars) if character == "\0" else _rows_where(chars == ord(character)))]
    return min(found, default=None)


def _inner_nul(chars: np.ndarray) -> np.ndarray:
    """The rows of a fixed-width bytes matrix with a NUL before another byte (numpy's length of a key stops only
    at its trailing NULs): a byte after a NUL that does not start a row, found in the flat bytes (one pass)."""
    nul = chars.ravel() == 0
    after = np.flatnonzero(nul[:-1] & ~nul[1:]) + 1
    return np.unique(after[after % chars.shape[1] != 0] // chars.shape[1])


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def as_text(keys: np.ndarray) -> np.ndarray:
    """UTF-8 bytes keys as str (`<U`), widening ASCII directly (far faster than decoding)."""
    if keys.dtype.kind == "U":
        return keys
    chars = np.ascontiguousarray(keys).view(np.uint8)
    if (chars < 128).all():
        return chars.astype("<u4").view(f"U{keys.dtype.itemsize}").reshape(keys.shape)
    return np.strings.decode(keys, "utf-8")

def as_lines(paths: np.ndarray) -> bytes:
    """Fixed-width bytes as newline-terminated lines, without the padding."""
    chars = byte_matrix(paths)
    lines = np.concatenate([chars, np.full((len(paths), 1), ord("\n"), np.uint8)], axis=1)
    return lines[lines != 0].tobytes()


def strip_extensions(keys: np.ndarray) -> np.ndarray:
    """Remove the extension of each path's last component, like posixpath.splitext, vectorised.

    `00012/000120034.jpg` -> `00012/000120034`; `a.b/c` and `.hidden` stay as they are.
    """
    if len(keys) == 0:
        return keys.copy()
    last_slash, last_dot = np.strings.rfind(keys, b"/"), np.strings.rfind(keys, b".")
    lengths = np.strings.str_len(keys)
    cut = np.where(last_dot > last_slash, last_dot, lengths)
    # splitext skips the leading dots of the last component (`.hidden`, `..x.y`): decide those rare
    # names one by one; for the rest, a dot after the last slash starts the extension.
    for i in np.flatnonzero((cut < lengths) & np.strings.startswith(keys, b".", last_slash + 1)):
        cut[i] = len(posixpath.splitext(keys[i])[0])
    narrow = max(1, int(cut.max()))  # no wider than the longest key: less to sort, store and send
    return np.strings.slice(keys, 0, cut).astype(f"S{narrow}")


DATACOMP_UID = np.dtype("u8,u8")  # a DataComp uid, 32 hex digits, as its (high, low) 64-bit halves
HEX_DIGITS = b"0123456789abcdef"


def datacomp_subset(keys: np.ndarray) -> np.ndarray:
    """Kept keys that are DataComp uids (32 hex digits) as DataComp's resharder takes them (`--subset_file`):
    (high, low) 64-bit halves, dtype u8,u8, sorted, each once."""
    try:  # every key 32 hex digits: then the concatenated text is 16 bytes a key, big-endian halves
        raw = bytes.fromhex(keys.tobytes().decode("ascii")) if keys.dtype.itemsize == 32 else b"?"
        if len(raw) != 16 * len(keys):  # (fromhex skips spaces: fewer bytes)
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        bad = next(key for key in keys.tolist() if len(key) != 32 or not all(c in HEX_DIGITS for c in key.lower()))
        raise UsageError("--datacomp-subset", f"the kept key {bad.decode('utf-8', 'replace')!r} is not a DataComp "
                         "uid (32 hex digits)", "use it on DataComp data, whose keys are the uids") from None
    high, low = np.frombuffer(raw, ">u8").reshape(len(keys), 2).T
    rising = (high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] > low[:-1]))
    if not rising.all():  # sorted keys are sorted uids, but for upper-case digits (and a uid twice in two cases)
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        first = np.concatenate([[True], (high[1:] != high[:-1]) | (low[1:] != low[:-1])])
        high, low = high[first], low[first]
    subset = np.empty(len(high), DATACOMP_UID)
    subset["f0"], subset["f1"] = high, low
    return subset

TEXT_BLOCK_BYTES = 1 << 20  # of a keys .txt, read at a time
UTF8_BOM = b"\xef\xbb\xbf"  # what some editors put at the start of a UTF-8 text file


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
            for start in range(0, shape[0], KEY_CHUNK_ROWS):
                count = min(KEY_CHUNK_ROWS, shape[0] - start)
                yield keys_as_utf8(np.fromfile(f, dtype, count), path, start)
    elif path.endswith(".parquet"):
        start = 0
        for batch in _parquet_file(path, column).iter_batches(batch_size=KEY_CHUNK_ROWS, columns=[column]):
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
