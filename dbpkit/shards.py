"""Webdataset shards to embedding parts (step 2 of the paper).

A shard's samples are read with webdataset's own tar reader (local paths, URLs, `pipe:` commands) and
decoded in torch DataLoader workers, each taking every W-th sample, so that the loader hands them over in
the shard's order. The model runs in the calling process on batches of consecutive samples of one shard:
the same batches, and so the same bytes, for any number of workers.

Each shard becomes one part of clip-retrieval's layout, numbered in shard order:
`img_emb/img_emb_<n>.npy` and `metadata/metadata_<n>.parquet` (image_path = the sample's __key__,
caption and url when the shard has them). While the run is staged, a part is named for its shard, not its
place (`parts/<hash of the url>.*`, with the samples without a decodable image and a record of the shard:
its url and content fingerprint), so that a rerun with another list of shards (one that cannot be read
left out, more appended) reuses the part of every shard in both; the parts are linked into the layout
once all are embedded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from dbpkit.cli import check_stop, stage
from dbpkit.encoder import Encoder, cached_encoder, embed, embedding_dim, load_processor
from dbpkit.errors import Incomplete, UsageError, WorkerDied
from dbpkit.files import atomic_open, file_fingerprint, write_npy
from dbpkit.keys import BAD_KEY_CHARACTERS
from dbpkit.local_engine import exit_with, lead_own_group, signal_group
from dbpkit.samples import first_line, open_image, shard_samples, text_fields, unreadable_reason

EMBEDDINGS_DIR, METADATA_DIR = "img_emb", "metadata"
PARTS_DIR = "parts"  # while the run is staged: each shard's part, named for the shard
PARQUET_ROWS = 1 << 16
SAFE_POINT_SECONDS = 1.0  # how often a wait for the decoding workers looks for Ctrl-C and SIGTERM


def part_files(out: str, url: str) -> tuple[str, str, str, str]:
    """The staged part of shard `url`: its embeddings, metadata, failures and the record of its shard."""
    name = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()
    base = os.path.join(out, PARTS_DIR, name)
    return f"{base}.npy", f"{base}.parquet", f"{base}.failed.txt", f"{base}.source.json"


def shard_record(url: str) -> str:
    """What a part records of its shard: the url (a pipe: command's stream cannot be fingerprinted) and the
    content's fingerprint, taken before the shard is read (a shard changed meanwhile is not taken for this one)."""
    return json.dumps({"url": url, "fingerprint": shard_fingerprint(url)})


def shard_fingerprint(url: str) -> str:
    """A local shard's content fingerprint; "" for a URL or pipe: command (what it streams cannot be known
    without reading it)."""
    return file_fingerprint(url) if os.path.isfile(url) else ""


def part_done(out: str, url: str) -> bool:
    """Shard `url`'s part is embedded, from the shard as it is now (a shard regenerated under the same name is
    not)."""
    emb, _, _, record = part_files(out, url)
    if not os.path.exists(emb):
        return False
    with open(record) as f:
        return f.read() == shard_record(url)


def place_part(out: str, url: str, n: int) -> None:
    """Shard `url`'s staged part as part n of clip-retrieval's layout under `out`: linked, so that it stays where
    it is (a run stopped while laying the parts out loses none), or copied where the file system has no links."""
    emb, meta, _, _ = part_files(out, url)
    for source, target in ((emb, os.path.join(out, EMBEDDINGS_DIR, f"img_emb_{n}.npy")),
                           (meta, os.path.join(out, METADATA_DIR, f"metadata_{n}.parquet"))):
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


# failed.txt: one sample a line, `shard<TAB>key<TAB>reason`, each field escaped so that any key round-trips.
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"}
_UNESCAPES = {value[1]: key for key, value in _ESCAPES.items()}


def escape_field(text: str) -> str:
    """Backslash escapes for a backslash, tab, newline, carriage return and NUL; a byte of a name that is not
    UTF-8 (Python's surrogate escape) as \\xHH."""
    return re.sub(r"[\\\t\n\r\0\udc80-\udcff]",
                  lambda m: _ESCAPES.get(m[0]) or f"\\x{ord(m[0]) - 0xDC00:02x}", text)


def unescape_field(text: str) -> str:
    return re.sub(r"\\(x[0-9a-f]{2}|.)",
                  lambda m: chr(0xDC00 + int(m[1][1:], 16)) if len(m[1]) == 3 else _UNESCAPES[m[1]], text)


def failed_line(url: str, key: str, reason: str) -> str:
    return "\t".join(escape_field(field) for field in (url, key, reason)) + "\n"


def read_failed(path: str) -> list[tuple[str, str, str]]:
    """failed.txt's samples: (shard, key, reason), as they were."""
    with open(path, encoding="utf-8") as f:
        return [tuple(unescape_field(field) for field in line.rstrip("\n").split("\t")) for line in f]


def key_problem(key: str) -> str | None:
    """Why a sample's key cannot be published (the key files of the next steps hold one key a line), or None."""
    if bad := next((name for character, name in BAD_KEY_CHARACTERS.items() if character in key), None):
        return f"its key holds {bad}, which no key file can hold"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "its key is not valid UTF-8"
    return None


def decoded(sample: dict, processor: Any) -> tuple[Any, str | None]:
    """(pixel values, None) for a sample with a decodable image, else (None, why not)."""
    image, failure = open_image(sample)
    if image is None:
        return None, failure
    try:
        return processor(images=image, return_tensors="pt")["pixel_values"][0], None
    except Exception as e:  # a processor's error on an odd image
        return None, f"the image cannot be processed ({type(e).__name__}: {first_line(e)})"


@dataclass
class Decoded:
    """A sample as a decoding worker hands it over, or (`unreadable`: why) the end of a shard that cannot be
    read further."""

    key: str = ""
    pixels: Any = None  # the processor's pixel values; None for a sample that failed
    caption: str | None = None
    url: str | None = None
    failure: str | None = None  # why the sample has no embedding
    unreadable: str | None = None
    no_room: str | None = None  # why a decoding worker could not put the pixels in shared memory


class ShardSamples(torch.utils.data.IterableDataset):
    """One shard's samples, Decoded, and a last one marked unreadable when the shard cannot be read further.
    Worker w of W yields samples w, w + W, ...: the DataLoader, taking one from each worker in turn, hands them
    over in the shard's order."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        processor = load_processor(self.model)
        try:
            for i, sample in enumerate(shard_samples(self.url)):
                if i % workers == worker:
                    key = sample["__key__"]
                    failure = key_problem(key)
                    pixels, failure = (None, failure) if failure else decoded(sample, processor)
                    if pixels is not None and info and (no_room := shared(pixels)):
                        yield Decoded(no_room=no_room)
                        return
                    caption, url = text_fields(sample)
                    yield Decoded(key, pixels, caption, url, failure)
        except Exception as e:  # a broken tar or a failed command: webdataset's errors vary
            yield Decoded(unreadable=unreadable_reason(e))


def shared(pixels: torch.Tensor) -> str | None:
    """Move a decoding worker's pixels into shared memory, where the loader hands them over; None, or why not.
    Done here, not left to the loader: its error there (shared memory full, Docker's 64 MB /dev/shm) is only
    printed, and the run would wait for that sample for ever."""
    try:
        pixels.share_memory_()
    except RuntimeError as e:
        return first_line(e)
    return None


class ShardUnreadable(Exception):
    """A shard that cannot be read (a truncated tar, a failed pipe: command): retried, then listed as failed."""


def embed_shard(encoder: Encoder, url: str, out: str, batch_size: int, workers: int, fp16: bool,
                step: Any = None) -> tuple[int, int]:
    """Embed shard `url` into its part under `out` (written whole, the embeddings file last: it marks the part
    done). Returns (rows, failed samples). `step(count)` is called after each batch (a progress bar)."""
    device = next(encoder.model.parameters()).device
    record = shard_record(url)
    started = functools.partial(_loader_worker_started, os.getpid()) if workers else None
    loader = torch.utils.data.DataLoader(ShardSamples(url, encoder.name), batch_size=None, num_workers=workers,
                                         multiprocessing_context="fork" if workers else None, worker_init_fn=started,
                                         timeout=SAFE_POINT_SECONDS if workers else 0)
    keys, captions, urls, vectors, failed, batch = [], [], [], [], [], []

    def flush() -> None:
        if batch:
            vectors.append(embed(encoder, torch.stack(batch).to(device), fp16))
            if step:
                step(len(batch))
            batch.clear()

    children = set(multiprocessing.active_children())  # (the loader's workers are those it adds)
    try:
        samples = with_safe_points(iter(loader))
        if workers:  # torch's SIGCHLD handler (set with the first loader's workers) raises wherever this process is
            # when a worker dies, in a destructor too, where it is a traceback (a SIGTERM to the process group can
            # kill a worker still starting, before it leaves the group): without it a dead worker is noticed on
            # its pipe or by torch's own look at its workers, and ends the run below with one line
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sample in samples:
            if not (keys or failed) and workers:
                stage("decoding")  # the decoding workers are running (named for fault-injection tests)
            if sample.unreadable:
                raise ShardUnreadable(sample.unreadable)
            if sample.no_room:
                raise Incomplete(f"shared memory is full: an image-decoding worker could not hand over an image "
                                 f"({sample.no_room}); the shards embedded so far are kept: free space in /dev/shm "
                                 "(with Docker: --shm-size), then rerun the same command")
            if sample.failure:
                failed.append(failed_line(url, sample.key, sample.failure))
                continue
            keys.append(sample.key)
            captions.append(sample.caption)
            urls.append(sample.url)
            batch.append(sample.pixels)
            if len(batch) == batch_size:
                flush()
    except BaseException as e:
        if workers:
            stop_workers(children)
            # a decoding worker killed from outside, as torch says it (or the pipe a sample was coming through)
            said = isinstance(e, RuntimeError) and "DataLoader worker" in str(e)
            if said or isinstance(e, (ConnectionError, EOFError)):
                raise WorkerDied(f"an image-decoding worker died, killed from outside ({first_line(e)})") from None
        raise
    flush()
    dim = embedding_dim(encoder)
    emb = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
    write_part(out, url, emb, keys, captions, urls, failed, record)
    return len(keys), len(failed)


def with_safe_points(samples: Iterator) -> Iterator:
    """The loader's samples; while it waits for one (a worker reading a stalled pipe: command, say), a safe point
    every SAFE_POINT_SECONDS, so that Ctrl-C and SIGTERM end the run. The loader's timeout raises and leaves it as
    it was, asked again."""
    while True:
        try:
            yield next(samples)
        except StopIteration:
            return
        except RuntimeError as e:
            if not str(e).startswith("DataLoader timed out"):
                raise
            check_stop()


def stop_workers(before: set) -> None:
    """End the processes the loader's workers (this process's children but `before`) started, a pipe: command's
    say, on whose output a worker may be waiting: SIGTERM to each worker's process group (each leads one). The
    workers themselves let it pass (_loader_worker_started) and end in the loader's own shutdown, which follows: a
    worker killed at the wrong moment would leave a lock of the loader's held, and that shutdown waiting on it for
    ever."""
    for worker in set(multiprocessing.active_children()) - before:
        signal_group(worker.pid, signal.SIGTERM)


def _loader_worker_started(run: int, worker_id: int) -> None:
    """In each image-decoding worker: Ctrl-C and SIGTERM (sent to the whole process group by a terminal, timeout(1)
    or a scheduler) are the run's to act on, at a safe point, where it stops its workers: the worker leaves the
    run's process group (Ctrl-C ignored until then). stop_workers' SIGTERM is for the commands it started (which
    take the default action again when they start): here it only interrupts a wait, as any signal does. And a
    worker ends the moment the run's process ends, however it ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _let_pass)
    lead_own_group()
    exit_with(run)


def _let_pass(signum: int, frame: Any) -> None:
    """A decoding worker's SIGTERM handler: nothing (see stop_workers)."""


def embed_shard_retrying(encoder: Encoder, url: str, out: str, batch_size: int, workers: int, fp16: bool,
                         retries: int, step: Any = None) -> str | None:
    """embed_shard, tried again up to `retries` times while the shard cannot be read. Returns None once the
    part is written, else why the shard could not be read."""
    counted = [0]

    def counting(count: int) -> None:
        counted[0] += count
        step(count)

    for attempt in range(retries + 1):
        counted[0] = 0
        try:
            embed_shard(encoder, url, out, batch_size, workers, fp16, counting if step else None)
            return None
        except ShardUnreadable as e:
            if counted[0]:
                step(-counted[0])  # the bar counts the images embedded, not the attempts
            reason = f"{e} (tried {attempt + 1} time{'s' if attempt else ''})"
    return reason


def embed_shard_task(task: tuple[str, str, str, str, int, bool, int]) -> str | None:
    """One shard as a task (on Ray): the images decoded in the task, the model loaded once per worker."""
    url, out, model, device, batch_size, fp16, retries = task
    if device == "cuda" and not torch.cuda.is_available():
        import socket

        import ray

        raise UsageError(f"--device cuda: node {socket.gethostname()}",
                         f"Ray gave this task GPU {ray.get_gpu_ids()}, but torch there sees no CUDA device",
                         "install torch with CUDA on the GPU nodes, or pass --device cpu")
    return embed_shard_retrying(cached_encoder(model, device), url, out, batch_size, 0, fp16, retries)


def write_part(out: str, url: str, emb: np.ndarray, keys: list, captions: list, urls: list, failed: list,
               record: str) -> None:
    """Shard `url`'s part: the record of its shard, its failures, its metadata (image_path, and caption and url
    where the shard had them), then its embeddings (float16, one row per key), each written whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb_path, meta_path, failed_path, record_path = part_files(out, url)
    with atomic_open(record_path, "w") as f:
        f.write(record)
    with atomic_open(failed_path, "w", encoding="utf-8") as f:
        f.writelines(failed)
    columns = {"image_path": pa.array(keys, pa.string())}
    for name, values in (("caption", captions), ("url", urls)):
        if any(v is not None for v in values):
            columns[name] = pa.array(values, pa.string())
    with atomic_open(meta_path) as f:
        pq.write_table(pa.table(columns), f, row_group_size=PARQUET_ROWS)
    with atomic_open(emb_path) as f:
        write_npy(f, emb)
