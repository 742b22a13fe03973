"""The kept-key trie: prune.py's `kept_keys_trie.pkl` (a pickled pygtrie.StringTrie), written and read.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pygtrie

from dbpkit.errors import UsageError
from dbpkit.keys import as_text, byte_matrix

# prune.py's outputs; params.json is written last and marks a run as complete.
TRIE_FILE = "kept_keys_trie.pkl"
KEPT_KEYS_FILE = "kept_keys.npy"
TRIE_SEPARATOR = "/"
TRIE_VALUE = 1
PICKLE_PROTOCOL = 4
TRIE_CHUNK_KEYS = 1 << 14  # keys turned into trie commands at a time
# What unpickling a pygtrie trie calls, and all load_trie allows: the trie classes and the node (any pygtrie
# version the package allows), the list our writer streams, and protocols 0-1's way of making an object
# (which name the modules as Python 2 did).
TRIE_GLOBALS = {("pygtrie", "StringTrie"), ("pygtrie", "CharTrie"), ("pygtrie", "Trie"), ("pygtrie", "_Node"),
                *((b, name) for b in ("builtins", "__builtin__") for name in ("list", "object")),
                ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")}


def trie_order(keys: np.ndarray) -> np.ndarray:
    """Sorted unique keys (bytes) reordered by their '/'-separated components: the order of the trie's nodes."""
    if len(keys) < 2:
        return keys
    # Component order is byte order with '/' below every other byte, so map '/' to 0x01 (or, should a
    # key hold 0x01 itself, compare split keys). Sorted keys are nearly always in component order
    # already (shard names of equal width): check that a block at a time, without a copy.
    def mapped(block: np.ndarray) -> np.ndarray:
        chars = byte_matrix(block)
        return np.where(chars == ord(TRIE_SEPARATOR), np.uint8(1), chars).view(keys.dtype).ravel()

    below = set()  # the bytes below '/' the keys hold (but the NULs that pad them)
    for i in range(0, len(keys), TRIE_CHUNK_KEYS):
        chars = byte_matrix(keys[i:i + TRIE_CHUNK_KEYS])
        below.update(np.unique(chars[(chars > 0) & (chars < ord(TRIE_SEPARATOR))]).tolist())
    if not below:  # '/' is the lowest byte already: byte order is component order (LAION's and DataComp's keys)
        return keys
    if 1 in below:
        return np.array(sorted(keys.tolist(), key=lambda k: k.split(b"/")), dtype=keys.dtype)
    previous = np.zeros(0, keys.dtype)
    for start in range(0, len(keys), TRIE_CHUNK_KEYS):
        block = np.concatenate([previous, mapped(keys[start:start + TRIE_CHUNK_KEYS])])
        if not (block[1:] >= block[:-1]).all():
            return keys[np.argsort(mapped(keys), kind="stable")]
        previous = block[-1:]
    return keys


def write_trie(f, keys: np.ndarray) -> None:
    """Pickle a pygtrie.StringTrie holding the sorted unique `keys` (UTF-8 bytes), each with value 1.

    pygtrie pickles a trie's root node as a flat list of walk commands (its `_Node.__getstate__`):
    `n, step_1 .. step_n, value` walks n steps down and sets a value, `-n` walks n steps up. Keys in
    component order give that list in one pass, so the list is streamed to the pickler from the keys
    instead of building the trie. Unpickled, it is the trie built key by key (the same mapping, nodes and
    behaviour); the bytes differ from pickling a built trie, which memoises and batches differently. No
    object is pickled twice, so the pickler keeps no memo (fast mode): its memo would hold every string.
    """
    # pygtrie's node state is not public API, but its public API builds a trie only key by key (hours and
    # tens of GB for LAION's 280M keys). Its pickled form has not changed in pygtrie 2.x; the tests check the
    # unpickled trie against one built key by key, so a release that changes it fails them.
    state = pygtrie.StringTrie(separator=TRIE_SEPARATOR).__getstate__()
    state["_root"] = _StreamedNode(trie_order(keys))
    pickler = pickle.Pickler(f, protocol=PICKLE_PROTOCOL)
    pickler.fast = True
    pickler.dump(_Pickled(pygtrie.StringTrie, state))


class _Pickled:
    """Pickles as `cls()` given `state`, like an instance of cls would (cls's __setstate__ takes it)."""

    def __init__(self, cls: type, state: Any):
        self.cls, self.state = cls, state

    def __reduce__(self) -> tuple:
        return self.cls, (), self.state


class _StreamedNode:
    """Pickles as a pygtrie node whose command list is streamed from the keys."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys

    def __reduce__(self) -> tuple:  # (chained: the pickler takes the commands a block at a time, in C)
        return pygtrie._Node, (), _StreamedList(itertools.chain.from_iterable(_trie_commands(self.keys)))


class _StreamedList:
    """Pickles as a list whose items come from an iterator (pickle appends them in batches as they come)."""

    def __init__(self, items: Any):
        self.items = items

    def __reduce__(self) -> tuple:
        return list, (), None, self.items


def _trie_commands(keys: np.ndarray) -> Iterator[list]:
    """pygtrie's node commands for keys in component order, a list per block of keys: per key [-up,] down, its
    new steps, value. Nearly
    every key is the previous key's sibling (one step up, one down, its last component); their commands are
    laid out a run of siblings at a time, and only the first key of a folder is worked out step by step."""
    previous, previous_folder = None, None  # the previous key (text) and its folder (bytes, up to its last '/')
    separator = TRIE_SEPARATOR.encode()
    for start in range(0, len(keys), TRIE_CHUNK_KEYS):
        block = keys[start:start + TRIE_CHUNK_KEYS]
        cut = np.strings.rfind(block, separator) + 1
        folders = np.strings.slice(block, 0, cut)
        try:
            leaves = as_text(np.strings.slice(block, cut, np.strings.str_len(block))).tolist()
            heads = np.flatnonzero(np.concatenate([[folders[0] != previous_folder], folders[1:] != folders[:-1]]))
            folder_texts = {h: folders[h].decode("utf-8") for h in heads.tolist()}
        except UnicodeDecodeError as e:
            raise UsageError(TRIE_FILE, f"a kept key is not UTF-8 ({e})", "fix the paths") from None
        commands: list[Any] = []
        ends = [*heads.tolist(), len(block)]
        _siblings(commands, leaves[:ends[0]])  # the previous block's last folder, continued
        if ends[0] > 0:
            previous = previous.rsplit(TRIE_SEPARATOR, 1)[0] + TRIE_SEPARATOR + leaves[ends[0] - 1] \
                if TRIE_SEPARATOR in previous else leaves[ends[0] - 1]
        for head, end in zip(ends[:-1], ends[1:]):
            text = folder_texts[head] + leaves[head]
            steps, old = text.split(TRIE_SEPARATOR), [] if previous is None else previous.split(TRIE_SEPARATOR)
            shared = 0
            while shared < min(len(old), len(steps)) and old[shared] == steps[shared]:
                shared += 1
            if shared < len(old):
                commands.append(shared - len(old))
            commands += (len(steps) - shared, *steps[shared:], TRIE_VALUE)
            _siblings(commands, leaves[head + 1:end])
            previous = folder_texts[head] + leaves[end - 1]
        previous_folder = folders[-1]
        yield commands


def _siblings(commands: list, leaves: list[str]) -> None:
    """Append the commands of a run of siblings of the key before them: per leaf, -1, 1, leaf, value."""
    run = [1] * (4 * len(leaves))
    run[0::4], run[2::4], run[3::4] = [-1] * len(leaves), leaves, [TRIE_VALUE] * len(leaves)
    commands += run


class _TrieUnpickler(pickle.Unpickler):
    """Unpickles a pygtrie trie and nothing else: a pickle names the callables it calls, and a kept-key file is
    a file people share, so any name a trie never needs is refused before anything is called (pickle's own
    documented way of restricting what a file may load)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in TRIE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which a pygtrie trie never needs")


def load_trie(path: str) -> pygtrie.StringTrie:
    """The kept-key trie written by prune.py (or by pickling any pygtrie.StringTrie). A file that is not one
    is refused without running anything it holds."""
    try:
        with open(path, "rb") as f:
            trie = _TrieUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RecursionError) as e:
        raise UsageError(path, f"is not a kept-key trie ({e})", f"pass the {TRIE_FILE} written by prune.py, or share "
                         f"{KEPT_KEYS_FILE}, which is read without pickle") from None
    if not isinstance(trie, pygtrie.StringTrie):
        raise UsageError(path, f"holds a {type(trie).__name__}, not a pygtrie.StringTrie",
                         f"pass the {TRIE_FILE} written by prune.py")
    return trie
