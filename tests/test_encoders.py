"""compute_embeddings.py's encoder families, each against its definition in transformers' own full model, and the
checkpoints it must refuse: one whose embedding head is not in its weights, one of no family it knows."""

import io
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
import tiny_models
import torch
from conftest import error_line, run_script
from PIL import Image
from test_embed import EMBED_SCRIPT, make_toy_images


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_shard")
    return make_toy_images.make_shards(str(root), 12, 12, seed=4)[0]


def images_of(shard):
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = list(dict.fromkeys(name.split(".")[0] for name in members))
    return keys, [next(members[f"{k}.{e}"] for e in ("jpg", "png", "webp") if f"{k}.{e}" in members) for k in keys]


def clip_definition(folder, pixels):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def siglip_definition(folder, pixels):
    from transformers import SiglipModel

    return SiglipModel.from_pretrained(folder).eval().vision_model(pixel_values=pixels).pooler_output


def vit_definition(folder, pixels):
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder).eval()
    return model.vit(pixel_values=pixels).last_hidden_state[:, 0]  # what its classifier reads: the CLS token


FAMILIES = [  # (id, saver, the model output params.json names, the embedding by the family's definition)
    ("clip", tiny_models.save_clip, "image_embeds", clip_definition),
    ("clip-laion-config", lambda f: tiny_models.save_clip(f, laion_config=True), "image_embeds", clip_definition),
    ("siglip", tiny_models.save_siglip, "pooler_output", siglip_definition),
    ("vit", tiny_models.save_vit, "cls", vit_definition),
]


@pytest.mark.parametrize("save,output,definition", [pytest.param(s, o, d, id=i) for i, s, o, d in FAMILIES])
def test_each_family_embeds_as_its_definition(shard, tmp_path, save, output, definition):
    import json

    from transformers import AutoImageProcessor

    folder = save(str(tmp_path / "model"))
    r = run_script(EMBED_SCRIPT, "--shards", shard, "--output_folder", tmp_path / "emb", "--model", folder,
                   "--batch-size", 5)
    assert r.returncode == 0, r.stderr
    emb = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy").astype(np.float64)
    keys, images = images_of(shard)
    assert pd.read_parquet(tmp_path / "emb" / "metadata" / "metadata_0.parquet")["image_path"].tolist() == keys
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    pixels = torch.cat([processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
                        ["pixel_values"] for data in images])
    with torch.inference_mode():
        expected = definition(folder, pixels).double().numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert emb.shape == expected.shape
    assert (np.sum(emb * expected, axis=1) > 0.999).all()
    params = json.loads((tmp_path / "emb" / "params.json").read_text())
    assert params["output"] == output and params["dim"] == expected.shape[1]


REFUSED = [  # (id, saver, what the one line says)
    ("clip-vision-without-projection", tiny_models.save_clip_vision_only,
     "has no weights for 1 tensor(s) its CLIP embedding uses (visual_projection.weight)"),
    ("vit-mae", tiny_models.save_vit_mae, "is a 'vit_mae' model, whose image embedding this tool does not know"),
]


@pytest.mark.parametrize("save,expect", [pytest.param(s, x, id=i) for i, s, x in REFUSED])
def test_a_model_whose_embedding_would_be_random_or_unknown_is_refused(shard, tmp_path, save, expect):
    folder = save(str(tmp_path / "model"))
    r = run_script(EMBED_SCRIPT, "--shards", shard, "--output_folder", tmp_path / "emb", "--model", folder)
    assert r.returncode == 2 and expect in error_line(r.stderr), r.stderr
    assert not os.path.exists(tmp_path / "emb")
    if "vit_mae" in expect:
        assert "DINOv2" in r.stderr and "SigLIP" in r.stderr  # the families it does know
