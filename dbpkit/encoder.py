"""The image encoder: a Hugging Face transformers vision model of a family researchers curate with, its own
image processor, and the embedding that is each family's documented image feature, L2-normalised.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dbpkit.cli import check_stop
from dbpkit.errors import UsageError


@dataclass(frozen=True)
class Family:
    """A family of vision models researchers curate with, and the output that is its image embedding."""

    name: str
    model_types: tuple[str, ...]  # config.model_type of its checkpoints (full models and vision towers)
    model_class: str  # the transformers class that loads its vision tower
    output: str  # the model output that is the embedding ("cls": the final layer-normed CLS token)


FAMILIES = (
    Family("DINOv2", ("dinov2", "dinov2_with_registers"), "AutoModel", "pooler_output"),  # the layer-normed CLS
    Family("CLIP", ("clip", "clip_vision_model"), "CLIPVisionModelWithProjection", "image_embeds"),
    Family("SigLIP", ("siglip", "siglip_vision_model"), "SiglipVisionModel", "pooler_output"),  # its MAP head
    Family("ViT", ("vit",), "ViTModel", "cls"),  # (ViT's pooler is a classifier's pre-logits layer: not used)
)


def family_of(model_type: str, name: str) -> Family:
    """The family of a checkpoint's model_type, or a UsageError listing the families supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    listed = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UsageError("--model", f"{name} is a {model_type!r} model, whose image embedding this tool does not know",
                     f"pass a model of a supported family: {listed}")


@dataclass(frozen=True)
class Encoder:
    """A loaded vision model and its image processor."""

    model: Any
    processor: Any
    output: str  # the model output that is the embedding (Family.output)
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


def looks_local(name: str) -> bool:
    """A --model that can only be a folder (a Hub id is `name` or `org/name`): absolute, relative to . or ~, or
    with more than one separator."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.path.isabs(name)


def load_encoder(name: str, device: str) -> Encoder:
    """A transformers vision model by id or local folder, as its family's vision tower; one clear error when it
    cannot be loaded, is of no supported family, or lacks weights of a layer it uses (transformers would fill
    them at random: embeddings that differ on every run)."""
    import transformers

    if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError("--model", f"{name} is not a folder", "pass the folder save_pretrained wrote, or a Hub id")
    transformers.logging.set_verbosity_error()  # its warnings and bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        family = family_of(config.model_type, name)
        tower = vision_config(config)
        kwargs = {"add_pooling_layer": False} if family.name == "ViT" else {}
        model, info = getattr(transformers, family.model_class).from_pretrained(
            name, config=tower, output_loading_info=True, **kwargs)
        processor = load_processor(name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # (RuntimeError: weights of other shapes)
        offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(e).lower() or "offline" in str(e).lower()
        why = "the Hugging Face Hub cannot be reached and the model is not in its cache" if offline and \
            not os.path.isdir(name) else str(e).strip().splitlines()[0]
        raise UsageError("--model", f"{name} cannot be loaded ({why})",
                         "pass a local folder with the model (save_pretrained), or a model id the Hub or its "
                         "cache holds") from None
    if missing := sorted(info.get("missing_keys") or []):
        head = " (a CLIPVisionModel checkpoint has no projection: save the whole CLIPModel)" \
            if family.name == "CLIP" and any("projection" in key for key in missing) else ""
        raise UsageError("--model", f"{name} has no weights for {len(missing)} tensor(s) its {family.name} "
                         f"embedding uses ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which "
                         f"transformers would initialise at random{head}",
                         "pass a complete checkpoint of the model (save_pretrained of the whole model)")
    stops_between_layers(model)
    return Encoder(model.eval().to(device), processor, family.output, name)


def stops_between_layers(model: torch.nn.Module) -> None:
    """A safe point before every layer the model runs: a batch of DINOv2-L on a CPU takes minutes (256 images), and
    Ctrl-C or SIGTERM is acted on within a layer's time, not the batch's (the batch is not kept: its shard is
    embedded again by the rerun)."""
    for module in model.modules():
        module.register_forward_pre_hook(lambda *_: check_stop())


def vision_config(config: Any) -> Any:
    """The vision tower's config of a checkpoint (the checkpoint's own config for a vision-only one). A CLIP
    tower takes the projection's size from the full config: LAION's OpenCLIP exports give it only there."""
    tower = getattr(config, "vision_config", None)
    if tower is None:
        return config
    if getattr(config, "projection_dim", None) is not None:
        tower.projection_dim = config.projection_dim
    return tower


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
        outputs = encoder.model(pixel_values=pixels)
        out = outputs.last_hidden_state[:, 0] if encoder.output == "cls" else getattr(outputs, encoder.output)
    out = out.float()
    return (out / out.norm(dim=1, keepdim=True)).cpu().numpy().astype(np.float16)


def embedding_dim(encoder: Encoder) -> int:
    config = encoder.model.config
    return config.projection_dim if encoder.output == "image_embeds" else config.hidden_size


@functools.lru_cache(maxsize=1)
def cached_encoder(model: str, device: str) -> Encoder:
    return load_encoder(model, device)
