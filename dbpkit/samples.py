"""Webdataset shards as the steps read them: the shards of a pattern, a shard's samples in order, and a
sample's image, caption and url (img2dataset's layout: `<key>.jpg`, `<key>.txt`, `<key>.json`).

compute_embeddings.py embeds the images; make_report.py shows them. Both read a shard with webdataset's own
tar reader (local paths, URLs, `pipe:` commands), so both see the same samples under the same keys.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

from dbpkit.errors import UsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_EXTENSIONS = (".tar.gz", ".tgz", ".tar")  # webdataset shards; the file name without it is the shard
READER_MODULES = ("webdataset.tariterators",)  # what reading a shard imports (torch too): for the workers
FAILED_FILE = "failed.txt"  # compute_embeddings.py's: shard<TAB>key<TAB>reason, the samples without an embedding


def is_local(url: str) -> bool:
    """A shard path (or pattern) on this file system, not a URL or a pipe: command."""
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    """A local shard path (or pattern) made absolute, a Ray worker starting in another folder, with ~ expanded:
    a brace pattern is quoted, and the shell leaves a quoted ~ alone. URLs and pipe: commands as they are."""
    return os.path.abspath(os.path.expanduser(url)) if is_local(url) else url


def find_shards(pattern: str) -> list[str]:
    """The shards of a webdataset pattern, local ones as absolute paths (local_path); they must exist (a URL or
    pipe: command is tried when read)."""
    from webdataset.shardlists import expand_urls

    urls = [local_path(s) for s in expand_urls(pattern)]
    local = [s for s in urls if is_local(s)]
    missing = [s for s in local if not os.path.isfile(s)]
    if local and len(missing) == len(urls):
        raise UsageError("--shards", f"{pattern!r} matches no shard (no {missing[0]})",
                         "check the path and the brace pattern, e.g. DATA/{00000..00099}.tar")
    if missing:
        raise UsageError("--shards", f"{missing[0]} does not exist ({len(missing)} of the {len(urls)} shards "
                         "are missing)", "check the pattern's range")
    return urls


def shard_stem(url: str) -> str | None:
    """The shard part of a `<shard>/<key>` key: `00012` for `.../00012.tar`, `https://host/00012.tar?sig=x`,
    and `pipe:` commands (`pipe:aws s3 cp s3://b/00012.tar -`): the last word naming a .tar, .tgz or
    .tar.gz. None if no word does."""
    for word in reversed(url.removeprefix("pipe:").split()):
        name = word.strip("'\"").split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        for extension in SHARD_EXTENSIONS:
            if name.endswith(extension) and len(name) > len(extension):
                return name[: -len(extension)]
    return None


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard as webdataset reads them: dicts of __key__ and each file's bytes."""
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples([{"url": url}])


def open_image(sample: dict) -> tuple[Any, str | None]:
    """(the sample's image as an RGB PIL image, None), or (None, why it has none)."""
    from PIL import Image

    found = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if found is None:
        return None, "no image (" + ", ".join(sorted(k for k in sample if not k.startswith("__"))) + ")"
    try:
        with warnings.catch_warnings():  # a large image: PIL's own limit (twice this) refuses a real bomb
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(sample[found])) as image:
                return image.convert("RGB"), None
    except Exception as e:  # PIL's errors share no base class worth naming
        return None, f"{found} cannot be decoded ({type(e).__name__}: {first_line(e)})"


def first_line(error: Exception) -> str:
    """An error's message, its first line, without the memory addresses some put in it (the same bytes every run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+| @ <[^>]*>", "", (str(error).splitlines() or [""])[0])


def unreadable_reason(error: Exception) -> str:
    """Why a shard could not be read further, in one line (webdataset's errors vary: some pass a tuple)."""
    said = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return f"{type(error).__name__}: {first_line(Exception(said))}"


def text_fields(sample: dict) -> tuple[str | None, str | None]:
    """(caption from .txt, url from .json), as img2dataset writes them; None where the sample has none."""
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
    url = None
    if "json" in sample:
        try:
            url = json.loads(sample["json"]).get("url")
        except (ValueError, AttributeError):
            url = None
    return caption, url if isinstance(url, str) or url is None else str(url)
