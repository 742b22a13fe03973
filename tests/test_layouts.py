"""Reading rows of the embeddings by index (deduplicate.py's clusters, k-means' sample, --subset): exactly numpy's
indexing of the whole array, whether the rows are read run by run or through mappings, and a file that changed
under the run is one line."""

import io
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbpkit import files, layouts
from dbpkit.errors import UsageError

ROWS = 40


def part_of(path) -> layouts.Part:
    if path.suffix == ".npz":  # (a DataComp shard: found in a folder of them)
        return layouts.Part(str(path), ROWS, 5, np.dtype(np.float32), None, npz_key="l14_img", offset=None)
    return layouts.find_embeddings(str(path), None, None, "l14_img", with_keys=False).parts[0]


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """One .npy per dtype users hold (big-endian too), and an .npz, of the same values."""
    folder = tmp_path_factory.mktemp("take")
    x = np.random.default_rng(0).standard_normal((ROWS, 5)).astype(np.float32)
    paths = {}
    for name, dtype in (("f4", "<f4"), ("f2", "<f2"), ("big", ">f4"), ("f8", "<f8")):
        paths[name] = folder / f"{name}.npy"
        np.save(paths[name], x.astype(dtype))
    paths["npz"] = folder / "x.npz"
    np.savez(paths["npz"], l14_img=x)
    return paths


# SPARSE_BYTES 0: every take read run by run; 1 << 40: every take through mappings, of WINDOW_BYTES 7 rows of the
# f4 file (the windows' boundaries among the rows).
WAYS = {"runs": {"SPARSE_BYTES": 0}, "windows": {"SPARSE_BYTES": 1 << 40, "WINDOW_BYTES": 7 * 5 * 4}}


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["f4", "f2", "big", "f8", "npz"]), way=st.sampled_from(sorted(WAYS)),
       rows=st.lists(st.integers(0, ROWS - 1), max_size=3 * ROWS).map(sorted) | st.just(list(range(ROWS))))
def test_take_is_numpys_indexing_read_either_way(arrays, kind, way, rows):
    """Runs of consecutive rows (the whole file, one row, none), repeats, rows far apart: each row as float32,
    as numpy's own indexing of the loaded array gives it, whichever way they are read."""
    part = part_of(arrays[kind])
    expected = (np.load(arrays[kind])["l14_img"] if kind == "npz" else np.load(arrays[kind]))[rows].astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in WAYS[way].items():
            patch.setattr(files, name, value)
        got = part.take(np.array(rows, dtype=np.int64))
        into = np.full((len(rows) + 2, 5), -1, np.float32)  # into the middle of a larger array, as unit_rows_at does
        part.take(np.array(rows, dtype=np.int64), out=into[1:-1])
    assert got.dtype == np.float32 and got.shape == (len(rows), 5)
    assert np.array_equal(got, expected)
    assert np.array_equal(into[1:-1], expected) and (into[[0, -1]] == -1).all()


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=3 * ROWS).map(sorted))
def test_each_run_of_consecutive_rows_is_one_read(arrays, rows):
    """A run is rows whose value less their position is one number (itertools.groupby on it), a repeated row
    starting a new run: each run is one read of its bytes, whole, in order."""
    part = part_of(arrays["f4"])  # 5 float32: 20 bytes a row
    runs = [[r for _, r in group] for _, group in itertools.groupby(enumerate(rows), key=lambda ir: ir[1] - ir[0])]
    reads = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "SPARSE_BYTES", 0)  # every run read, none mapped
        read = files.read_exactly
        patch.setattr(files, "read_exactly", lambda f, start, buffer, path: (
            reads.append((start, len(buffer))), read(f, start, buffer, path)))
        part.take(np.array(rows, dtype=np.int64))
    assert reads == [(part.offset + run[0] * 20, len(run) * 20) for run in runs]


def test_few_runs_or_runs_far_apart_are_read_and_the_others_mapped(tmp_path, monkeypatch):
    """The choice between the two ways: at most FEW_RUNS runs (3 here) are read; so are more when they lie
    SPARSE_BYTES (line rows of 64 bytes) apart on average."""
    used = []
    monkeypatch.setattr(files, "FEW_RUNS", 3)
    monkeypatch.setattr(files, "_read_into", lambda *a: used.append("runs"))
    monkeypatch.setattr(files, "_map_windows", lambda *a: used.append("windows"))
    np.save(tmp_path / "emb.npy", np.zeros((8000, 16), np.float32))
    part = part_of(tmp_path / "emb.npy")
    line = files.SPARSE_BYTES // 64
    for rows in ([0, line // 2, line, 3 * line // 2],  # 4 runs over 1.5 lines of rows: 3/8 of a line apart
                 [0, 1500, 3000, 3001],  # 3 runs
                 [0, 2 * line, 4 * line, 6 * line],  # 4 runs, 1.5 lines apart
                 [0, line, 2 * line, 4 * line - 1],  # 4 runs over 4 lines of rows: a line apart exactly
                 [0, line, 2 * line, 4 * line - 2]):  # just under
        part.take(np.array(rows))
    assert used == ["windows", "runs", "runs", "runs", "windows"]


def test_runs_read_one_by_one_are_all_asked_for_first(arrays, monkeypatch):
    """From disk each run would be a wait of its own: every run's bytes are asked for (posix_fadvise WILLNEED)
    before the first is read. Where the system has no such call, or refuses it, the rows are read all the same."""
    events = []
    reads = files.read_exactly
    monkeypatch.setattr(files, "SPARSE_BYTES", 0)
    monkeypatch.setattr(files, "WILL_NEED", "willneed")
    monkeypatch.setattr(files.os, "posix_fadvise", lambda fd, start, length, advice: events.append(
        ("ask", start, length, advice)), raising=False)
    monkeypatch.setattr(files, "read_exactly", lambda f, start, buffer, path: (
        events.append(("read", start, len(buffer))), reads(f, start, buffer, path)))
    part = part_of(arrays["f2"])  # float16: 10 bytes a row
    rows = np.array([3, 4, 5, 9, 20, 21, 39])
    assert np.array_equal(part.take(rows), np.load(arrays["f2"])[rows].astype(np.float32))
    start = np.load(arrays["f2"], mmap_mode="r").offset
    runs = [(start + 3 * 10, 30), (start + 9 * 10, 10), (start + 20 * 10, 20), (start + 39 * 10, 10)]
    assert events == [("ask", a, n, "willneed") for a, n in runs] + [("read", a, n) for a, n in runs]

    events.clear()
    monkeypatch.setattr(files, "WILL_NEED", None)  # macOS: no posix_fadvise
    assert np.array_equal(part.take(rows), np.load(arrays["f2"])[rows].astype(np.float32))
    assert events == [("read", a, n) for a, n in runs]

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    events.clear()
    monkeypatch.setattr(files, "WILL_NEED", "willneed")
    monkeypatch.setattr(files.os, "posix_fadvise", refuse, raising=False)
    assert np.array_equal(part.take(rows), np.load(arrays["f2"])[rows].astype(np.float32))
    assert events == [("read", a, n) for a, n in runs]


def test_short_reads_are_read_on_until_the_buffer_is_full():
    """A read may return less than asked (past 2 GB, a pipe-like file system): the rest is read after it."""
    class Trickle(io.RawIOBase):  # hands out at most 3 bytes a read
        def __init__(self, data):
            self.data, self.at = data, 0

        def readable(self):
            return True

        def seek(self, offset, whence=0):
            self.at = offset
            return offset

        def readinto(self, buffer):
            piece = self.data[self.at:self.at + min(3, len(buffer))]
            buffer[:len(piece)] = piece
            self.at += len(piece)
            return len(piece)

    data = bytes(range(100))
    buffer = bytearray(40)
    files.read_exactly(Trickle(data), 17, memoryview(buffer), "x.npy")
    assert bytes(buffer) == data[17:57]


@pytest.mark.parametrize("way", sorted(WAYS))
def test_a_file_cut_short_after_its_header_was_read_is_named(tmp_path, monkeypatch, way):
    """The header promised 40 rows; the file lost its last ones while the run went on: the row past its end is
    an error naming the file, not a short row of zeros (nor a traceback, read either way)."""
    for name, value in WAYS[way].items():
        monkeypatch.setattr(files, name, value)
    path = tmp_path / "emb.npy"
    np.save(path, np.ones((ROWS, 5), np.float32))
    part = part_of(path)
    with open(path, "r+b") as f:
        f.truncate(part.offset + 38 * 5 * 4 + 7)  # 38 rows and a piece of the 39th
    assert np.array_equal(part.take(np.array([0, 34])), np.ones((2, 5), np.float32))
    with pytest.raises(UsageError) as e:
        part.take(np.array([2, 38]))
    assert str(e.value).startswith(f"{path}: ends before the rows its header promises")


def test_a_bad_row_among_the_subsets_rows_is_named_by_its_row_in_the_file(tmp_path):
    """--subset's rows are read a chunk at a time, every third row here: the NaN at row 123 of the file is named
    row 123 (it is the subset's 42nd row, the chunk's too)."""
    from dbpkit import kmeans

    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    x[123] = np.nan
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "subset.npy", np.arange(0, 300, 3))
    np.save(tmp_path / "centroids.npy", np.eye(4, 16, dtype=np.float32))
    task = (part_of(tmp_path / "emb.npy"), 0, 300, str(tmp_path / "centroids.npy"), True, str(tmp_path / "out.npy"),
            str(tmp_path / "subset.npy"), 0)
    with pytest.raises(UsageError) as e:
        kmeans.assign_rows(task)
    assert str(e.value).startswith(f"{tmp_path / 'emb.npy'}: row 123: embedding is not finite")
    assert not (tmp_path / "out.npy").exists()


def test_rows_of_many_parts_are_normalised_as_each_part_alone(tmp_path):
    """unit_rows_at normalises the rows of all parts in one pass; a part holding a row whose norm is past float32's
    range is normalised as before, on its own in float64, and the other parts' rows keep their float32 bits."""
    rng = np.random.default_rng(2)
    pieces = [rng.standard_normal((30, 8)).astype(np.float32) for _ in range(3)]
    pieces[1][4] = 3e38  # its squares overflow float32
    parts = []
    for n, x in enumerate(pieces):
        np.save(tmp_path / f"p{n}.npy", x)
        parts.append(part_of(tmp_path / f"p{n}.npy"))
    rows = np.array([1, 2, 5, 33, 34, 40, 61, 89])  # from each part; 34 is the huge row
    got = layouts.Embeddings(parts).unit_rows_at(rows)
    whole = np.concatenate(pieces)
    expected = []
    for row in rows.tolist():
        x = whole[row:row + 1]
        if 30 <= row < 60:  # the part with the huge row: float64 throughout
            expected.append((x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True))
                            .astype(np.float32))
        else:
            expected.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    assert np.array_equal(got, np.concatenate(expected))
    assert np.isfinite(got).all() and np.allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1, atol=1e-6)


@pytest.fixture(scope="module")
def many_parts(tmp_path_factory):
    """Parts of every kind a layout holds: little- and big-endian float32, float16, float64, an .npz, an empty part;
    each of its own rows (their values tell their row of the whole)."""
    folder = tmp_path_factory.mktemp("parts")
    sizes = [7, 0, 12, 1, 9, 15, 6, 4, 5, 8]
    kinds = ["<f4", "<f4", ">f4", "<f4", "<f2", "<f8", "npz", "<f2", "npz16", "<f2"]
    whole = np.arange(sum(sizes) * 3, dtype=np.float32).reshape(-1, 3) / 8  # (exact in float16 too)
    parts, first = {}, 0
    for n, (size, kind) in enumerate(zip(sizes, kinds)):
        x = whole[first:first + size]
        first += size
        path = folder / f"p{n}.{'npz' if kind.startswith('npz') else 'npy'}"
        if kind.startswith("npz"):  # compressed: no offset, read by its take
            dtype = np.dtype(np.float16 if kind == "npz16" else np.float32)
            np.savez_compressed(path, l14_img=x.astype(dtype))
            parts[n] = layouts.Part(str(path), size, 3, dtype, None, npz_key="l14_img", offset=None)
            continue
        np.save(path, x.astype(kind))
        shape, dtype, _, offset = files.read_npy_header(str(path))
        parts[n] = layouts.Part(str(path), shape[0], 3, dtype, None, offset=offset)
    return whole, [parts[n] for n in sorted(parts)]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), way=st.sampled_from(sorted(WAYS)), gather=st.sampled_from([2, 5, 1 << 13]),
       kind=st.sampled_from(["<f4", "<f2", "mixed"]))
def test_rows_of_many_parts_are_read_as_numpy_indexes_their_whole(many_parts, data, way, gather, kind):
    """read_rows_of_parts, the runs of all parts found in one pass (parts of one dtype, float32 or float16 as LAION's)
    or each part by its own take (mixed dtypes), a few rows gathered at a time or all: each row as numpy's indexing
    of the whole gives it, whichever way each share is read, a run never carried past its part's end."""
    whole, parts = many_parts
    if kind != "mixed":  # the parts of one dtype (an empty one among the float32, a compressed .npz the float16)
        parts = [p for p in parts if p.dtype == np.dtype(kind)]
    total = sum(p.rows for p in parts)
    starts = np.cumsum([0] + [p.rows for p in parts])
    expected_whole = np.concatenate([whole[:0]] + [np.asarray(
        np.load(p.path)["l14_img"] if p.offset is None else np.load(p.path), np.float32) for p in parts])
    rows = np.array(data.draw(st.lists(st.integers(0, total - 1)).map(sorted)), np.int64)  # (repeats too)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**WAYS[way], "GATHER_ROWS": gather}.items():
            patch.setattr(files, name, value)
        out = np.full((len(rows) + 2, 3), -1, np.float32)
        files.read_rows_of_parts(parts, starts, rows, out[1:-1])
    assert np.array_equal(out[1:-1], expected_whole[rows]) and (out[[0, -1]] == -1).all()
