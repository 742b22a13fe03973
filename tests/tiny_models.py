"""Tiny random checkpoints of each encoder family (and of what must be refused), saved as save_pretrained does."""

import json
import os

SIZE = 56  # pixels: the processors' crop
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _vision(hidden: int = 32) -> dict:
    return dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=SIZE, patch_size=14)


def save_clip(folder: str, seed: int = 0, *, laion_config: bool = False) -> str:
    """A whole CLIPModel (text and vision towers, both projections). laion_config: the vision config names no
    projection_dim, as LAION's OpenCLIP exports write it (only the full config has it)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=99), vision_config=_vision(),
                        projection_dim=24)
    CLIPModel(config).save_pretrained(folder)
    if laion_config:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            saved = json.load(f)
        saved["vision_config"].pop("projection_dim", None)
        saved["text_config"].pop("projection_dim", None)
        with open(path, "w") as f:
            json.dump(saved, f)
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                          image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


def save_clip_vision_only(folder: str, seed: int = 0) -> str:
    """A CLIPVisionModel: CLIP's vision tower without its projection (the head image_embeds needs)."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**_vision(), projection_dim=24)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        folder)
    return folder


def save_siglip(folder: str, seed: int = 0) -> str:
    """A whole SiglipModel (text and vision towers)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=99), vision_config=_vision())
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def save_vit(folder: str, seed: int = 0) -> str:
    """A ViT saved from an image classifier: its weights hold no pooler (the CLS token is the embedding)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(seed)
    ViTForImageClassification(ViTConfig(**_vision(), num_labels=3)).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def save_vit_mae(folder: str, seed: int = 0) -> str:
    """A ViT-MAE: of no family this tool embeds with."""
    import torch
    from transformers import ViTImageProcessorPil, ViTMAEConfig, ViTMAEModel

    torch.manual_seed(seed)
    ViTMAEModel(ViTMAEConfig(**_vision())).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder
