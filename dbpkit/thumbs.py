"""The images a report shows, gathered by streaming webdataset shards, a task per shard.

A key of the cluster files names a sample as `<shard stem>/<__key__>` or as `__key__` alone, with or
without an extension (`00012/000120034.jpg`), as the loader filter matches them. Where a key's form names
its shard (own_keys), only that shard is read for it. A task reads its shard in order, up to the last
wanted sample, and hands back, for each wanted key it meets, the caption, the url and a JPEG thumbnail
(or why there is none): a few kilobytes a sample shown, whatever the size of the shard.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dbpkit.files import atomic_open
from dbpkit.samples import is_local, open_image, shard_samples, shard_stem, text_fields, unreadable_reason

THUMBS_DIR = "thumbs"
JPEG_QUALITY = 85


@dataclass
class Found:
    """What a shard holds for one wanted key."""

    caption: str | None = None
    url: str | None = None
    jpeg: bytes | None = None  # the thumbnail; None when the image cannot be shown
    missing: str | None = None  # why not


@dataclass
class ShardResult:
    found: dict[str, Found]  # by the key's form without extension
    unreadable: str | None = None  # why the shard could not be read to its end


def thumb_name(key: str) -> str:
    """A thumbnail's file name: a hash of the key (keys hold slashes and any Unicode)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".jpg"


def thumbnail(sample: dict, size: int) -> Found:
    caption, url = text_fields(sample)
    image, failure = open_image(sample)
    if image is None:
        return Found(caption, url, missing=failure)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return Found(caption, url, out.getvalue())


def own_keys(urls: list[str], wanted: set[str]) -> tuple[dict[int, set[str]], set[str]]:
    """The shard each wanted key belongs to: a key `<stem>/<rest>` whose stem is a given shard's, or img2dataset's
    key (digits: `000120034`) beginning with a given shard's stem of digits (`00012.tar`), belongs to the shards of
    that stem; the others cannot be placed. Returns the keys of each shard holding some (by its place in `urls`),
    and those of none."""
    by_stem: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        if stem := shard_stem(url):
            by_stem.setdefault(stem, []).append(i)
    digit_stems = sorted({len(stem) for stem in by_stem if stem.isdigit()})
    own: dict[int, set[str]] = {}
    nowhere = set()
    for key in wanted:
        shards = by_stem.get(key.split("/", 1)[0]) if "/" in key else None
        if shards is None and key.isdigit():
            shards = next((by_stem[key[:n]] for n in digit_stems if n < len(key) and key[:n] in by_stem), None)
        for i in shards or ():
            own.setdefault(i, set()).add(key)
        if not shards:
            nowhere.add(key)
    return own, nowhere


def gather_shard(task: tuple[str, frozenset[str], int]) -> ShardResult:
    """One shard's wanted samples (task: url, the wanted keys without extension, thumbnail size in pixels), read
    up to the last of them."""
    url, wanted, size = task
    stem, found = shard_stem(url), {}
    try:
        for sample in shard_samples(url):
            key = sample["__key__"]
            for form in (f"{stem}/{key}" if stem else None, key):
                if form in wanted and form not in found:
                    found[form] = thumbnail(sample, size)
            if len(found) == len(wanted):
                break
    except Exception as e:  # a truncated tar or a failed pipe: command (webdataset's errors vary); what was
        # read stays shown, the rest becomes placeholders that say why
        return ShardResult(found, unreadable_reason(e))
    return ShardResult(found)


def gather_images(urls: list[str], wanted: set[str], size: int, thumbs: str, pool) -> tuple[dict[str, Found], list]:
    """The wanted samples by their stripped key (thumbnails written under `thumbs`), and the shards that could not
    be read to the end. A key whose form names its shard (own_keys) is looked for there only: of LAION's
    40,000 shards a report reads the few thousand its samples are in, each up to the last of them. A key its shard
    did not hold (read to the end) is then looked for in every other shard, as a key of no known shard is in
    every shard from the start; the first shard holding a key, in that order, wins."""
    own, nowhere = own_keys(urls, wanted)
    found, unreadable = {}, {}
    nowhere = frozenset(nowhere)  # (one set for every shard without keys of its own)
    _read_shards(urls, range(len(urls)) if nowhere else sorted(own),
                 lambda i: frozenset(own[i] | nowhere) if i in own else nowhere, size, thumbs, pool, "reading shards",
                 found, unreadable)
    elsewhere = frozenset(key for i, keys in own.items() if i not in unreadable for key in keys if key not in found)
    if elsewhere:  # (keys not where their form said: every other shard is read for them)
        _read_shards(urls, [i for i in range(len(urls)) if i not in own or not elsewhere <= own[i]],
                     lambda i: frozenset(elsewhere - own[i]) if i in own else elsewhere, size, thumbs, pool,
                     "the other shards, for keys not in their own", found, unreadable)
    return found, [(urls[i], why) for i, why in sorted(unreadable.items())]


def _read_shards(urls: list[str], shards: Sequence[int], keys: Callable[[int], frozenset[str]], size: int,
                 thumbs: str, pool, desc: str, found: dict[str, Found], unreadable: dict[int, str]) -> None:
    """Read each shard i of `shards` (places in `urls`) for keys(i), into `found` (a key found already stays) and
    `unreadable` (shard i: why it could not be read to the end). A task's keys are made as it is handed out."""
    jobs = ((urls[i], keys(i), size) for i in shards)
    streams = not all(is_local(urls[i]) for i in shards)
    for i, result in zip(shards, pool.run(gather_shard, jobs, desc, unit="shard", total=len(shards), streams=streams),
                         strict=True):
        if result.unreadable:
            unreadable.setdefault(i, result.unreadable)
        for key, sample in result.found.items():
            if key in found:
                continue
            if sample.jpeg is not None:
                with atomic_open(os.path.join(thumbs, thumb_name(key))) as f:
                    f.write(sample.jpeg)
                sample.jpeg = None  # on disk now: only the captions stay in memory
            found[key] = sample
