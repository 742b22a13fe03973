"""Key rules, the trie writer, kept_keys.npy and the webdataset filter."""

import io
import os
import pickle
import posixpath
import random
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import pygtrie
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbp_utils as du
from dbpkit import trie as trie_module
from dbpkit.keys import keys_as_utf8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PATH_CHARS = st.sampled_from(list("ab.-/1é_"))
paths = st.text(PATH_CHARS, min_size=1, max_size=12)


def built_trie(keys, value=1):
    """What the trie should be: a pygtrie.StringTrie built key by key, in the given order."""
    trie = pygtrie.StringTrie(separator="/")
    for key in keys:
        trie[key] = value
    return trie


def written_trie(keys):
    """write_trie of str keys, loaded back with the standard unpickler."""
    unique = np.array(sorted({k.encode() for k in keys}), dtype=bytes) if keys else np.zeros(0, "S1")
    f = io.BytesIO()
    du.write_trie(f, unique)
    return pickle.loads(f.getvalue())


# Keys as users have them: ASCII, the Latin-1 range right above it (U+0080..U+00FF, where a fast path's
# boundary would show), other scripts and astral characters; no surrogates, line breaks or NULs (refused).
KEY_CHARS = st.one_of(st.characters(min_codepoint=1, max_codepoint=0x7F),
                      st.characters(min_codepoint=0x80, max_codepoint=0xFF),
                      st.characters(codec="utf-8", min_codepoint=0x100)).filter(lambda c: c not in "\t\r\n")
keys_text = st.lists(st.text(KEY_CHARS, min_size=1, max_size=10), max_size=20)


@settings(max_examples=400, deadline=None)
@given(keys_text)
def test_every_key_is_its_utf8_encoding_and_back(values):
    """The fast paths (ASCII widened or narrowed by numpy views) agree with str.encode / bytes.decode."""
    from dbpkit.keys import as_text

    as_str = np.array(values, dtype=str) if values else np.zeros(0, "U1")
    utf8 = keys_as_utf8(as_str, "keys")
    assert utf8.tolist() == [v.encode("utf-8") for v in values]
    assert keys_as_utf8(utf8, "keys").tolist() == utf8.tolist()  # bytes in: checked, unchanged
    assert as_text(utf8).tolist() == values


@settings(max_examples=300, deadline=None)
@given(keys_text, st.sampled_from([b"\n", b"\r\n"]), st.booleans(), st.booleans())
def test_text_keys_are_the_files_lines(values, newline, final, bom):
    """A keys .txt, read a few bytes at a time (lines cross blocks), gives its lines as UTF-8 bytes, whatever the
    line ending, with or without a last newline or a byte order mark."""
    from dbpkit import keys

    data = (keys.UTF8_BOM if bom else b"") + newline.join(v.encode() for v in values) + (newline if final else b"")
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(keys, "TEXT_BLOCK_BYTES", 7):
        path = os.path.join(folder, "keys.txt")
        with open(path, "wb") as f:
            f.write(data)
        lines = [key for block in keys._text_lines(path) for key in block.tolist()]
    assert lines == ([v.encode() for v in values] if values else [b""] if final else [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=20), st.booleans())
def test_distances_parse_as_python_floats(values, as_bytes):
    from dbpkit.clusters import parse_distances

    text = np.array([repr(v) for v in values], dtype="S" if as_bytes else "U") if values else np.zeros(0, "U1")
    assert parse_distances(text, "cluster_0.npy").tolist() == [float(repr(v)) for v in values]


def float32_text(value: float) -> str:
    """How a float32 distance prints (values beyond float32's range as they are)."""
    return str(np.float32(value)) if abs(value) <= float(np.finfo(np.float32).max) else repr(value)


FLOAT_FORMATS = (repr, "%.17g".__mod__, "%.6f".__mod__, "%.25e".__mod__, float32_text, "%.3g".__mod__)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=20), st.sampled_from(FLOAT_FORMATS))
def test_distance_parser_gives_pythons_bits(values, fmt):
    """Arrow parses the column; Python's float() of each string is the reference, bit for bit."""
    from dbpkit.clusters import parse_floats

    text = [fmt(v) for v in values]
    got = parse_floats(np.array([t.encode() for t in text], dtype="S") if text else np.zeros(0, "S1"))
    assert got.dtype == np.float64 and got.flags.writeable
    assert got.view(np.int64).tolist() == np.array([float(t) for t in text], dtype=np.float64).view(np.int64).tolist()


def test_distance_parser_on_every_kind_of_double():
    """Random bit patterns (subnormals, extremes, every exponent), written the ways files write them."""
    from dbpkit.clusters import parse_floats

    rng = np.random.default_rng(7)
    values = np.frombuffer(rng.bytes(8 * 40_000), np.float64)
    values = np.concatenate([values[np.isfinite(values)], rng.random(20_000), rng.random(20_000).astype(np.float32)])
    for fmt in FLOAT_FORMATS[:4]:
        text = [fmt(float(v)) for v in values]
        expected = np.array([float(t) for t in text]).view(np.int64)
        assert np.array_equal(parse_floats(np.array(text, dtype="S")).view(np.int64), expected), fmt


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**63 - 1), min_size=65, max_size=200), st.integers(0, 3), st.booleans())
def test_row_numbers_are_read_as_int_reads_them(values, zeros, as_str):
    """A column of plain digits (leading zeros too, up to int64's largest), as str or bytes, read through Arrow."""
    from dbpkit.clusters import ARROW_MIN_VALUES, parse_row_numbers

    text = ["0" * zeros + str(v) for v in values]
    column = np.array(text) if as_str else np.array([t.encode() for t in text])
    got = parse_row_numbers(column[1:])  # a view that starts inside the buffer
    assert len(column) - 1 >= ARROW_MIN_VALUES and got.dtype == np.int64
    assert got.tolist() == [int(t) for t in text[1:]]


def test_row_numbers_other_than_plain_digits_are_numpys_to_read():
    """A sign, spaces, underscores, a fraction, non-ASCII digits, an empty value or one past int64 in a long
    column: read or refused exactly as numpy's cast reads or refuses them."""
    from dbpkit.clusters import parse_row_numbers

    plain = [str(i) for i in range(100)]
    for odd in (" 5", "+5", "5 ", "1_0", "-3", "", "x", "1.0", "\u0663", "9223372036854775808"):
        for column in (np.array(plain + [odd]), np.array([t.encode() for t in plain + [odd]])):
            outcomes = []
            for parse in (parse_row_numbers, lambda c: c.astype(np.int64)):
                try:
                    outcomes.append(parse(column).tolist())
                except (ValueError, OverflowError) as e:
                    outcomes.append(type(e))
            assert outcomes[0] == outcomes[1], (odd, column.dtype)


def test_distance_parser_reads_what_numpy_reads_and_refuses_the_rest():
    """What Arrow refuses goes to numpy's cast: spaces, underscores and padding are read as float() reads them; a
    NUL inside a value, an empty value, text or bytes that are not UTF-8 are refused, with the row named."""
    from dbpkit.clusters import parse_distances, parse_floats

    readable = [b" 1.5", b"1_0", b"2.5\t", b"+.5", b"1e-3", b"7"]
    assert parse_floats(np.array(readable)).tolist() == [1.5, 10.0, 2.5, 0.5, 0.001, 7.0]
    long = [b"0.5"] * 70  # a column long enough for Arrow, which hands what it refuses to numpy
    assert parse_floats(np.array(long + readable)).tolist()[-6:] == [1.5, 10.0, 2.5, 0.5, 0.001, 7.0]
    padded = np.array([b"0.25", b"0.125"], dtype="S8")  # the NULs after each value are numpy's padding
    assert parse_floats(padded).tolist() == [0.25, 0.125]
    assert parse_floats(padded[1:]).tolist() == [0.125]  # a view that starts inside the buffer
    for bad in (b"1.5\x00x", b"\x001", b"", b"abc", b"\xff1", b"1.5.2"):
        with pytest.raises(ValueError):
            parse_floats(np.array([b"0.5", b"0.75", bad]))
        with pytest.raises(du.UsageError, match=r"cluster_3\.npy: row 12: distance .* is not a number"):
            parse_distances(np.array([b"0.5", b"0.75", bad]), "cluster_3.npy", first_row=10)
        with pytest.raises(du.UsageError, match=r"cluster_3\.npy: row 80: distance .* is not a number"):
            parse_distances(np.array(long + [bad]), "cluster_3.npy", first_row=10)


def test_parsing_distances_leaves_pandas_unimported():
    """Arrow's numpy conversions import pandas (0.16 s and ~45 MB in every worker); the parser goes around them."""
    code = ("import sys, numpy as np; from dbpkit.clusters import parse_distances; "
            "assert parse_distances(np.array(['0.5', '1.25'] * 100), 'c').tolist() == [0.5, 1.25] * 100; "
            "assert 'pyarrow' in sys.modules and 'pandas' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\t\n\r\0"), max_size=6),
                min_size=1, max_size=12), st.integers(0, 11), st.sampled_from(["\t", "\n", "\r", "\0"]),
       st.integers(0, 6))
def test_keys_no_key_file_can_hold_are_refused_at_their_first_row(values, row, bad, at):
    """The first row whose key holds a tab, a newline, a carriage return, or a NUL before its last other byte
    (numpy's fixed-width bytes drop only trailing NULs), is the row named, with what it holds; keys without any
    pass unchanged."""
    clean = np.array([v.encode() for v in values], dtype=f"S{max(1, max(len(v.encode()) for v in values))}")
    assert keys_as_utf8(clean, "k.npy").tolist() == clean.tolist()
    row = row % len(values)
    values[row] = values[row][:at] + bad + values[row][at:] + ("x" if bad == "\0" else "")
    values = [v.encode() for v in values]
    named = {"\t": "a tab", "\n": "a newline", "\r": "a carriage return", "\0": "a NUL"}[bad]
    with pytest.raises(du.UsageError, match=f"k.npy: row {row + 3}: key .* holds {named} \\("):
        keys_as_utf8(np.array(values), "k.npy", first_row=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b"ab", b"a/1", b"b/2", b"\xc3\xa9", b"a" * 17]), max_size=40),
       st.integers(1, 4), st.integers(1, 3))
def test_repeated_key_finds_a_repeat_exactly_whatever_the_hashes_say(values, buckets, batch):
    """Two rows holding one key are found, and only those: with the real hashes, and with hashes forced to collide
    (every key in one of a few buckets, so that unequal keys share a hash), a few repeated hashes per batch."""
    from dbpkit import keys as keys_module

    keys = np.array(values, dtype="S17") if values else np.zeros(0, "S1")
    unique = len(set(values)) == len(values)
    colliding = np.array([sum(v) % buckets for v in values], np.uint64)
    for hashes in (keys_module.key_hashes(keys), colliding):
        with mock.patch.object(keys_module, "REPEAT_BATCH", batch), mock.patch.object(keys_module, "KEY_CHUNK_ROWS", 3):
            found = keys_module.repeated_key(keys, hashes)
        if unique:
            assert found is None
        else:
            a, b = found
            assert a < b and values[a] == values[b]


@settings(max_examples=500, deadline=None)
@given(st.lists(paths, max_size=30))
def test_strip_extensions_is_splitext(values):
    arr = np.array([v.encode() for v in values], dtype=object).astype(bytes) if values else np.zeros(0, "S1")
    got = [b.decode() for b in du.strip_extensions(arr).tolist()]
    assert got == [posixpath.splitext(v)[0] for v in values]


def test_strip_extension_examples():
    paths = ["00012/000120034.jpg", "00012/000120034", "a.b/c", "dir/.hidden", "x/y.tar.gz", "é/x.jpg"]
    utf8 = keys_as_utf8(np.array(paths), "cluster_0.npy")
    assert utf8.tolist() == [p.encode() for p in paths]
    assert [k.decode() for k in du.strip_extensions(utf8).tolist()] == [
        "00012/000120034", "00012/000120034", "a.b/c", "dir/.hidden", "x/y.tar", "é/x"]


def check_trie(keys):
    """The written trie loads as the trie built key by key (in any order), and works as one."""
    loaded = written_trie(keys)
    assert type(loaded) is pygtrie.StringTrie
    shuffled = list(keys)
    random.Random(0).shuffle(shuffled)
    expected = built_trie(shuffled)
    assert loaded == expected  # the same mapping ...
    assert loaded._root.equals(expected._root) and loaded._separator == "/"  # ... from the same nodes
    assert sorted(loaded.items()) == sorted(expected.items()) == sorted((k, 1) for k in keys)
    for key in sorted(keys)[:5]:  # put together right, it changes like the built one
        for trie in (loaded, expected):
            trie[key + "/new"] = 2
            del trie[key]
    assert loaded == expected


@settings(max_examples=300, deadline=None)
@given(st.sets(paths, max_size=40))
def test_written_trie_is_the_built_trie(keys):
    check_trie(keys)


components = st.text(st.sampled_from(list("ab.-1é_")), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4).flatmap(lambda depth: st.sets(st.tuples(*[components] * depth), max_size=40)))
def test_written_trie_of_equal_depth_keys(parts):
    check_trie({"/".join(p) for p in parts})


def test_written_trie_edge_keys():
    keys = ["a", "a/b", "a/b/c", "a-b/x", "a/x", "1/1", "2/1", "é/ü", "", "x//y", "x/", "z/.jpg"]
    check_trie(keys)
    trie = written_trie(keys)
    assert all(du.trie_search(trie, k) for k in keys)
    assert not du.trie_search(trie, "x") and not du.trie_search(trie, "a/b/c/d")
    check_trie(["00001/000010001", "00001/000010002", "00002/000020001", "00010/x"])
    check_trie([f"{s}/{i:03d}" for s in ("1", "10", "1-0", "2") for i in range(5)])  # unequal shard widths


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 18])
def test_written_trie_of_many_keys_across_chunks(monkeypatch, chunk):
    """Keys turned into commands a few at a time or all at once, long names, deep and shallow keys."""
    monkeypatch.setattr(trie_module, "TRIE_CHUNK_KEYS", chunk)
    rng = random.Random(chunk)
    keys = {f"{s:05d}/{i:09d}" for s in range(40) for i in rng.sample(range(10**6), 300)}
    keys |= {f"{c}/{i}" for c in "abcé" for i in range(30)} | {"z" * 300 + "/x", "é/" + "ü" * 200}
    keys |= {f"deep/{i % 3}/{i % 7}/{i}" for i in range(500)}
    check_trie(keys)


def test_write_trie_refuses_keys_that_are_not_utf8():
    with pytest.raises(du.UsageError, match="not UTF-8"):
        du.write_trie(io.BytesIO(), np.array([b"a/1", b"b/\xff"]))


def test_trie_holds_plain_str_keys():
    trie = written_trie(["00001/000010001", "00001/000010002"])
    assert all(type(k) is str for k in trie.keys()) and trie["00001/000010002"] == 1


def test_kept_keys_membership(tmp_path):
    keys = np.array(sorted([b"00001/000010001", b"00001/000010003", b"00002/x", "é/ü".encode()]))
    path = tmp_path / "kept_keys.npy"
    np.save(str(path), keys)
    kept = du.load_kept_keys(str(path))
    assert len(kept) == 4
    assert all(k.decode() in kept for k in keys)
    for absent in ("00001/000010002", "00001", "00002/x/y", "00001/0000100011234567890", ""):
        assert absent not in kept
    assert "00002/x" in pickle.loads(pickle.dumps(kept))


def test_trie_order_checks_across_blocks(monkeypatch):
    monkeypatch.setattr(trie_module, "TRIE_CHUNK_KEYS", 2)
    keys = np.array([b"0", b"a-b/x", b"a/x", b"z"])  # byte order; components put a/x first
    assert du.trie_order(keys).tolist() == [b"0", b"a/x", b"a-b/x", b"z"]
    in_order = np.array([b"00001/1", b"00001/2", b"00002/1", b"00003/0"])
    assert du.trie_order(in_order) is in_order


@settings(max_examples=300, deadline=None)
@given(st.sets(st.text(st.sampled_from(["/", "0", "1", "a", "-", ".", " ", "\x01", "é"]), min_size=1, max_size=6),
               max_size=25), st.integers(1, 4))
def test_trie_order_is_component_order(values, chunk):
    """Sorted keys come back in the order of their '/'-separated components (the definition, by Python's sort):
    keys with bytes below '/' ('-', '.', ' ', 0x01) and keys without any, a few keys to a block."""
    keys = sorted(v.encode() for v in values)
    with mock.patch.object(trie_module, "TRIE_CHUNK_KEYS", chunk):
        got = du.trie_order(np.array(keys, dtype=f"S{max([len(k) for k in keys] + [1])}"))
    assert got.tolist() == sorted(keys, key=lambda k: k.split(b"/"))


def test_kept_key_collector_sorts_dedupes_and_widens():
    collector = du.KeptKeyCollector(7)
    for part in ([b"b/2", b"a/1"], [b"c/333333", b"a/1"], [], [b"b/10", b"a/0", b"z"]):
        collector.add(np.array(sorted(part), dtype=f"S{max([len(p) for p in part] + [1])}"))
    assert collector.sorted_unique().tolist() == sorted({b"a/0", b"a/1", b"b/10", b"b/2", b"c/333333", b"z"})


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_kept_key_collector_sorts_in_threads(threads):
    """Pieces sorted by threads, then merged: the same keys as sorting them all at once, repeats across pieces
    included."""
    from dbpkit import selection

    rng = random.Random(threads)
    parts = [sorted(f"{rng.randrange(40):02d}/{rng.randrange(10 ** rng.randrange(1, 4))}".encode()
                    for _ in range(rng.randrange(0, 30))) for _ in range(25)]
    collector = du.KeptKeyCollector(sum(len(p) for p in parts))
    for part in parts:
        collector.add(np.array(part, dtype=f"S{max([len(k) for k in part] + [1])}"))
    with mock.patch.object(selection, "MIN_PIECE_KEYS", 5):
        got = collector.sorted_unique(threads).tolist()
    assert got == sorted({k for part in parts for k in part})
