"""Images to embeddings (step 2 of the paper): webdataset shards through a Hugging Face vision model.

A shard's samples are read with webdataset's own tar reader (local paths, URLs, `pipe:` commands) and
decoded in torch DataLoader workers, each taking every W-th sample of the shard, so that the loader hands
them over in the shard's order. The image is the sample's jpg, jpeg, png or webp, prepared by the model's
own AutoImageProcessor (its resize, crop and normalisation; the PIL backend: no torchvision needed). The
model runs in the calling process on batches of consecutive samples of one shard: the same batches,
and so the same bytes, for any number of workers. The embedding is DINOv2's pooler_output (the
layer-normed CLS token) or, for CLIP checkpoints, image_embeds; L2-normalised, stored float16.

Each shard becomes one part of clip-retrieval's layout, numbered in shard order:
`img_emb/img_emb_<n>.npy` and `metadata/metadata_<n>.parquet` (image_path = the sample's __key__,
caption and url when the shard has them), plus the samples without a decodable image, in `failed/<n>.txt`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from dbp_cli import UsageError, atomic_open

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
EMBEDDINGS_DIR, METADATA_DIR, FAILED_DIR = "img_emb", "metadata", "failed"
CLIP_TYPES = ("clip", "clip_vision_model")  # model_type of CLIP checkpoints: their image_embeds are the embedding
PARQUET_ROWS = 1 << 16


def part_files(out: str, n: int) -> tuple[str, str, str]:
    """Part n's embeddings, metadata and failures, in clip-retrieval's layout."""
    return (os.path.join(out, EMBEDDINGS_DIR, f"img_emb_{n}.npy"),
            os.path.join(out, METADATA_DIR, f"metadata_{n}.parquet"), os.path.join(out, FAILED_DIR, f"{n}.txt"))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """A loaded vision model and its image processor."""

    model: Any
    processor: Any
    output: str  # "pooler_output" (DINOv2 and most) or "image_embeds" (CLIP)
    name: str

    def describe(self) -> dict:
        """What params.json records: the model, its revision or weights' hash, the processor's settings."""
        config = self.model.config
        described = {"model": self.name, "model_type": config.model_type, "output": self.output,
                     "revision": getattr(config, "_commit_hash", None) or weights_hash(self.name),
                     "processor": self.processor.to_dict(), "dtype": "float16"}
        return json.loads(json.dumps(described))  # as read back from params.json (tuples as lists)


@functools.lru_cache(maxsize=2)
def load_processor(name: str) -> Any:
    """The model's own image processor, its PIL backend (torchvision is not needed, nor wanted: its wheels
    must match torch's build exactly)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(name, backend="pil")


def load_encoder(name: str, device: str) -> Encoder:
    """A transformers vision model by id or local folder: CLIP's vision tower with its projection for CLIP
    checkpoints, AutoModel otherwise. One clear error when it cannot be loaded."""
    import transformers

    transformers.logging.set_verbosity_error()  # its warnings and bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        if config.model_type in CLIP_TYPES:
            model, output = transformers.CLIPVisionModelWithProjection.from_pretrained(name), "image_embeds"
        else:
            model, output = transformers.AutoModel.from_pretrained(name), "pooler_output"
        processor = load_processor(name)
    except (OSError, ValueError, KeyError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(e).lower() or "offline" in str(e).lower()
        why = "the Hugging Face Hub cannot be reached and the model is not in its cache" if offline and \
            not os.path.isdir(name) else str(e).splitlines()[0]
        raise UsageError("--model", f"{name} cannot be loaded ({why})",
                         "pass a local folder with the model (save_pretrained), or a model id the Hub or its "
                         "cache holds") from None
    return Encoder(model.eval().to(device), processor, output, name)


def weights_hash(name: str) -> str | None:
    """For a local model folder: the sha256 of its weight files (what a Hub revision says of a download)."""
    if not os.path.isdir(name):
        return None
    digest = hashlib.sha256()
    for file in sorted(f for f in os.listdir(name) if f.endswith((".safetensors", ".bin"))):
        with open(os.path.join(name, file), "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def embed(encoder: Encoder, pixels, fp16: bool) -> np.ndarray:
    """A batch of pixel values (torch, on the model's device) as L2-normalised float16 embeddings."""
    with torch.inference_mode(), torch.autocast(pixels.device.type, torch.float16, enabled=fp16):
        out = getattr(encoder.model(pixel_values=pixels), encoder.output)
    out = out.float()
    return (out / out.norm(dim=1, keepdim=True)).cpu().numpy().astype(np.float16)


# ---------------------------------------------------------------------------------------------
# The samples of a shard, decoded in DataLoader workers
# ---------------------------------------------------------------------------------------------


def shard_samples(url: str):
    """The samples of one shard as webdataset reads them: dicts of __key__ and each file's bytes."""
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples([{"url": url}])


def decoded(sample: dict, processor: Any) -> tuple[Any, str | None]:
    """(pixel values, None) for a sample with a decodable image, else (None, why not)."""
    from PIL import Image

    found = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if found is None:
        return None, "no image (" + ", ".join(sorted(k for k in sample if not k.startswith("__"))) + ")"
    try:
        with Image.open(io.BytesIO(sample[found])) as image:
            rgb = image.convert("RGB")
        return processor(images=rgb, return_tensors="pt")["pixel_values"][0], None
    except Exception as e:  # PIL's errors (and a processor's on an odd image) share no base class worth naming
        return None, f"{found} cannot be decoded ({type(e).__name__}: {first_line(e)})"


def first_line(error: Exception) -> str:
    """An error's message, its first line, without the memory addresses some put in it (the same bytes every run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", (str(error).splitlines() or [""])[0])


def text_fields(sample: dict) -> tuple[str | None, str | None]:
    """(caption from .txt, url from .json), as img2dataset writes them; None where the sample has none."""
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
    url = None
    if "json" in sample:
        try:
            url = json.loads(sample["json"]).get("url")
        except (ValueError, AttributeError):
            url = None
    return caption, url


class ShardSamples(torch.utils.data.IterableDataset):
    """One shard's samples: (key, pixels or None, caption, url, failure), or a final ("error", message) when the
    shard cannot be read. Worker w of W yields samples w, w + W, ...: the DataLoader, taking one from each
    worker in turn, hands them over in the shard's order."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        processor = load_processor(self.model)
        try:
            for i, sample in enumerate(shard_samples(self.url)):
                if i % workers == worker:
                    pixels, failure = decoded(sample, processor)
                    yield ("sample", sample["__key__"], pixels, *text_fields(sample), failure)
        except Exception as e:  # a broken tar or a failed command: webdataset's errors vary
            yield ("error", f"{type(e).__name__}: {first_line(e)}")


# ---------------------------------------------------------------------------------------------
# One shard, one part
# ---------------------------------------------------------------------------------------------


def embed_shard(encoder: Encoder, url: str, n: int, out: str, batch_size: int, workers: int, fp16: bool,
                step: Any = None) -> tuple[int, int]:
    """Embed shard `url` into part n under `out` (written whole, the embeddings file last: it marks the part
    done). Returns (rows, failed samples). `step(count)` is called after each batch (a progress bar)."""
    device = next(encoder.model.parameters()).device
    loader = torch.utils.data.DataLoader(ShardSamples(url, encoder.name), batch_size=None, num_workers=workers,
                                         multiprocessing_context="fork" if workers else None)
    keys, captions, urls, vectors, failed, batch = [], [], [], [], [], []

    def flush() -> None:
        if batch:
            vectors.append(embed(encoder, torch.stack(batch).to(device), fp16))
            if step:
                step(len(batch))
            batch.clear()

    for record in loader:
        if record[0] == "error":
            raise UsageError(url, f"cannot be read as a webdataset shard ({record[1]})",
                             "check the shard, or the command of a pipe: URL")
        _, key, pixels, caption, link, failure = record
        if failure:
            failed.append(f"{url}\t{key}\t{failure}\n")
            continue
        keys.append(key)
        captions.append(caption)
        urls.append(link)
        batch.append(pixels)
        if len(batch) == batch_size:
            flush()
    flush()
    dim = embedding_dim(encoder)
    emb = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
    write_part(out, n, emb, keys, captions, urls, failed)
    return len(keys), len(failed)


def embed_shard_task(task: tuple[str, int, str, str, str, int, bool]) -> tuple[int, int]:
    """One shard as a task (on Ray): the images decoded in the task, the model loaded once per worker."""
    url, n, out, model, device, batch_size, fp16 = task
    return embed_shard(cached_encoder(model, device), url, n, out, batch_size, 0, fp16)


@functools.lru_cache(maxsize=1)
def cached_encoder(model: str, device: str) -> Encoder:
    return load_encoder(model, device)


def embedding_dim(encoder: Encoder) -> int:
    config = encoder.model.config
    return getattr(config, "projection_dim", None) if encoder.output == "image_embeds" else config.hidden_size


def write_part(out: str, n: int, emb: np.ndarray, keys: list, captions: list, urls: list, failed: list) -> None:
    """Part n: its failures, its metadata (image_path, and caption and url where the shard had them), then its
    embeddings (float16, one row per key), each written whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb_path, meta_path, failed_path = part_files(out, n)
    with atomic_open(failed_path, "w") as f:
        f.writelines(failed)
    columns = {"image_path": pa.array(keys, pa.string())}
    for name, values in (("caption", captions), ("url", urls)):
        if any(v is not None for v in values):
            columns[name] = pa.array(values, pa.string())
    with atomic_open(meta_path) as f:
        pq.write_table(pa.table(columns), f, row_group_size=PARQUET_ROWS)
    with atomic_open(emb_path) as f:
        np.save(f, emb)
