"""compute_embeddings.py: webdataset shards in, clip-retrieval's layout out, checked against transformers itself."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CLUSTER_SCRIPT, CPUS, ROOT, error_line, outputs, run_script, start_script, wait_paused

EMBED_SCRIPT = "compute_embeddings.py"
sys.path.insert(0, os.path.join(ROOT, "examples"))
import make_toy_images  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Three shards of 40 images (sizes 48..160 px, jpg/png/webp, non-ASCII captions); shard 1 also holds a
    corrupt jpg and a sample without an image. And a tiny random DINOv2 in a folder."""
    root = tmp_path_factory.mktemp("toy_images")
    paths = make_toy_images.make_shards(str(root / "shards"), 120, 40, seed=1)
    with tarfile.open(paths[1], "a") as tar:
        for name, payload in (("broken.jpg", b"\xff\xd8 not really a jpeg"), ("broken.txt", b"a"),
                              ("textonly.txt", b"no picture here")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    model = make_toy_images.save_tiny_dinov2(str(root / "model"))
    return {"root": root, "shards": paths, "pattern": str(root / "shards" / "{00000..00002}.tar"), "model": model}


def embed(toy, out, *extra):
    r = run_script(EMBED_SCRIPT, "--shards", toy["pattern"], "--output_folder", out, "--model", toy["model"],
                   "--batch-size", 16, *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """One run with two decoding workers, that the other runs must match byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "emb"
    return out, embed(toy, out, "--workers", 2)


def test_embeddings_are_what_transformers_gives_image_by_image(toy, reference):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    out, r = reference
    assert "embedded 120 images of 3 shards" in r.stdout and "2 without a decodable image" in r.stdout
    processor = AutoImageProcessor.from_pretrained(toy["model"], backend="pil")
    model = AutoModel.from_pretrained(toy["model"]).eval()
    for n, shard in enumerate(toy["shards"]):
        emb = np.load(out / "img_emb" / f"img_emb_{n}.npy")
        meta = pd.read_parquet(out / "metadata" / f"metadata_{n}.parquet")
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = list(dict.fromkeys(name.split(".")[0] for name in members))  # in the tar's order
        images = [(k, next(members[f"{k}.{e}"] for e in ("jpg", "png", "webp") if f"{k}.{e}" in members))
                  for k in keys if k not in ("broken", "textonly")]
        assert emb.dtype == np.float16 and emb.shape == (len(images), 32)
        assert meta["image_path"].tolist() == [k for k, _ in images]  # rows in the shard's order
        assert meta["caption"].tolist() == [members[f"{k}.txt"].decode() for k, _ in images]
        assert meta["url"].tolist() == [json.loads(members[f"{k}.json"])["url"] for k, _ in images]
        with torch.inference_mode():
            for row, (_, data) in zip(emb, images):
                pixels = processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
                expected = model(**pixels).pooler_output[0].numpy()
                cosine = row.astype(np.float64) @ expected / np.linalg.norm(expected)
                assert cosine > 0.999 and abs(np.linalg.norm(row.astype(np.float64)) - 1) < 1e-3
    failed = (out / "failed.txt").read_text().splitlines()
    assert [line.split("\t")[:2] for line in failed] == [[toy["shards"][1], "broken"], [toy["shards"][1], "textonly"]]
    assert "jpg cannot be decoded" in failed[0] and "no image (txt)" in failed[1]
    params = json.loads((out / "params.json").read_text())
    assert params["model_type"] == "dinov2" and params["output"] == "pooler_output" and params["dim"] == 32
    assert params["revision"].startswith("sha256:") and params["processor"]["crop_size"] == {"height": 56, "width": 56}
    r = run_script(CLUSTER_SCRIPT, "--embeddings", out / "img_emb", "--num_clusters", 4,
                   "--save_folder", out.parent / "clusters")  # clip-retrieval's layout, read as it is
    assert r.returncode == 0 and "clustered 120 rows (dim 32, 3 part(s))" in r.stdout, r.stderr


def test_same_bytes_with_one_worker_and_piped_shards(toy, reference, tmp_path):
    r = run_script(EMBED_SCRIPT, "--shards", f"pipe:cat {toy['pattern']}", "--output_folder", tmp_path / "pipe",
                   "--model", toy["model"], "--batch-size", 16, "--workers", 1)
    assert r.returncode == 0, r.stderr
    piped, expected = outputs(tmp_path / "pipe"), outputs(reference[0])
    failed = Path("failed.txt")
    assert {name: data for name, data in piped.items() if name != failed} == \
        {name: data for name, data in expected.items() if name != failed}
    # the failures name the shard as given
    assert piped[failed] == expected[failed].replace(toy["shards"][1].encode(), f"pipe:cat {toy['shards'][1]}".encode())


def test_a_killed_run_redoes_only_the_missing_parts(toy, reference, tmp_path, monkeypatch):
    proc = start_script(EMBED_SCRIPT, "--shards", toy["pattern"], "--output_folder", tmp_path / "emb", "--model",
                        toy["model"], "--batch-size", 16, pause="shard 1 embedded")
    wait_paused(proc, "shard 1 embedded")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "emb" / "params.json").exists()
    # The rerun names the same paths from a ~ that the shell left alone (a brace pattern is quoted).
    home = os.path.commonpath([tmp_path, toy["root"]])
    monkeypatch.setenv("HOME", home)
    r = run_script(EMBED_SCRIPT, *(f"~/{os.path.relpath(a, home)}" if os.path.isabs(a) else a for a in (
        "--shards", toy["pattern"], "--output_folder", str(tmp_path / "emb"), "--model", toy["model"])),
        "--batch-size", 16)
    assert r.returncode == 0, r.stderr
    assert "2 embedded before" in r.stdout
    assert outputs(tmp_path / "emb") == outputs(reference[0])


BAD = [  # (id, flags replaced, what the one line says)
    ("model-missing", {"--model": "no/such-model"}, "--model: no/such-model cannot be loaded"),
    ("model-empty-folder", {"--model": "EMPTY"}, "cannot be loaded"),
    ("no-shard", {"--shards": "NOWHERE/{00000..00003}.tar"}, "matches no shard"),
    ("some-shards-missing", {"--shards": "SHARDS/{00000..00005}.tar"}, "00003.tar does not exist (3 of the 6"),
    ("batch-zero", {"--batch-size": 0}, "--batch-size: 0 is less than 1"),
    ("fp16-on-cpu", {"--fp16": ""}, "--fp16: is for --device cuda"),
    ("model-not-a-folder", {"--model": "./no/such/model"}, "--model: ./no/such/model is not a folder"),
    ("retries-negative", {"--retries": -1}, "--retries: -1 is negative"),
    # a typo's thousands of decoding processes, each shard's: the machine swamped for minutes, now refused at once
    ("workers-thousands", {"--workers": 4 * CPUS + 1},
     f"--workers: {4 * CPUS + 1} is more than 4 for each of this machine's {CPUS} CPUs (pass at most {4 * CPUS}"),
]


@pytest.mark.parametrize("flags,expect", [pytest.param(f, x, id=i) for i, f, x in BAD])
def test_bad_input_is_one_line_and_writes_nothing(toy, tmp_path, flags, expect):
    (tmp_path / "empty").mkdir()
    args = {"--shards": toy["pattern"], "--output_folder": tmp_path / "out", "--model": toy["model"], **flags}
    where = {"EMPTY": tmp_path / "empty"}
    argv = []
    for flag, value in args.items():
        value = where.get(value, value) if isinstance(value, str) else value
        if isinstance(value, str):
            value = value.replace("NOWHERE", str(tmp_path / "nowhere")).replace("SHARDS", str(toy["root"] / "shards"))
        argv += [flag] + ([value] if value != "" else [])
    r = subprocess.run([sys.executable, os.path.join(ROOT, EMBED_SCRIPT), *map(str, argv)], capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and expect in error_line(r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_the_five_steps_from_images(tmp_path):
    """examples/images_demo.sh: images -> embeddings -> deduplicate -> cluster the kept rows -> DBP -> a loader."""
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "images_demo.sh"), str(tmp_path / "demo")],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable, "IMAGES": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    kept = np.load(tmp_path / "demo" / "run" / "kept_keys.npy")
    deduplicated = np.load(tmp_path / "demo" / "dedup" / "eps_0.001" / "kept_keys.npy")
    assert 0 < len(kept) == len(deduplicated) // 2 and set(kept.tolist()) <= set(deduplicated.tolist())
    assert len(deduplicated) < 200  # the near-repeats of make_toy_images, found
    assert f"the filter let through {len(kept)} samples" in r.stdout
    entries = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())  # step 6: the report
    assert {e["role"] for e in entries} == {"kept", "pruned", "removed", "duplicate-of"}
    assert all((tmp_path / "demo" / "report" / e["image"]).is_file() for e in entries)


def shard_copies(toy, folder, count=3):
    """Copies of the toy shards (which the test may then change), and their brace pattern."""
    folder.mkdir()
    for n in range(count):
        shutil.copy(toy["shards"][n % len(toy["shards"])], folder / f"{n:05d}.tar")
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


def test_an_unreadable_shard_is_retried_listed_and_the_others_kept(toy, reference, tmp_path):
    pattern = shard_copies(toy, tmp_path / "shards", 4)
    data = (tmp_path / "shards" / "00003.tar").read_bytes()
    (tmp_path / "shards" / "00003.tar").write_bytes(data[: len(data) // 2])  # truncated mid-file
    out = tmp_path / "emb"
    r = run_script(EMBED_SCRIPT, "--shards", pattern, "--output_folder", out, "--model", toy["model"],
                   "--batch-size", 16)
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr)
    assert "1 of 4 shards could not be read" in line and "rerun the same command" in line
    assert "or leave them out of --shards to do without them (lists join with ::" in line  # (as below)
    listed = (out / "failed_shards.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(tmp_path / "shards" / "00003.tar") + "\t")
    assert "unexpected end of data" in listed[0] and "tried 3 times" in listed[0] and "<_io" not in listed[0]
    assert not (out / "params.json").exists() and not (out / "img_emb").exists()  # nothing published
    staged = out / ".dbp_staging" / "parts"  # each part named for its shard, which its record names
    records = {json.loads(p.read_text())["url"] for p in staged.glob("*.source.json")}
    assert records == {str(tmp_path / "shards" / f"{n:05d}.tar") for n in range(3)}
    assert len(list(staged.iterdir())) == 3 * 4  # embeddings, metadata, failures, record
    parts = {p.name: p.read_bytes() for p in staged.iterdir()}
    # A rerun with another batch size (other bits) would have to start afresh: refused, the parts kept for this one.
    r = run_script(EMBED_SCRIPT, "--shards", pattern, "--output_folder", out, "--model", toy["model"],
                   "--batch-size", 8)
    assert r.returncode == 2 and error_line(r.stderr) == (
        f"error: --output_folder: {out} holds the unfinished work of a stopped run that differs in --batch_size "
        "(rerun that run's command to finish it, or pass --overwrite to discard its work and start afresh)")
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == parts
    # So would one on a GPU (on Ray's nodes here: this machine has none), whose float32 is not the CPU's.
    r = run_script(EMBED_SCRIPT, "--shards", pattern, "--output_folder", out, "--model", toy["model"],
                   "--batch-size", 16, "--device", "cuda", "--distributor", "ray")
    assert r.returncode == 2 and "a stopped run that differs in --device (rerun" in error_line(r.stderr)
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == parts
    # Another list of shards (the broken one left out, the others in another order): the parts of the shards in both
    # are reused, laid out in the new order, as a fresh run on that list writes them.
    shutil.copytree(out, tmp_path / "emb2")
    (tmp_path / "emb2" / ".dbp_staging" / "img_emb").mkdir()  # as a run stopped while laying the parts out leaves it
    (tmp_path / "emb2" / ".dbp_staging" / "img_emb" / "img_emb_0.npy").write_bytes(b"a part of the list before")
    listed = f"{tmp_path}/shards/00002.tar::{tmp_path}/shards/00001.tar"  # (webdataset's list of shards)
    r = run_script(EMBED_SCRIPT, "--shards", listed, "--output_folder", tmp_path / "emb2", "--model", toy["model"],
                   "--batch-size", 16)
    assert r.returncode == 0 and "2 embedded before" in r.stdout, r.stderr
    got, expected = outputs(tmp_path / "emb2"), outputs(reference[0])
    for new, old in ((0, 2), (1, 1)):
        for name in ("img_emb/img_emb_{}.npy", "metadata/metadata_{}.parquet"):
            assert got[Path(name.format(new))] == expected[Path(name.format(old))]
    assert sorted(os.listdir(tmp_path / "emb2" / "img_emb")) == ["img_emb_0.npy", "img_emb_1.npy"]
    failures = (tmp_path / "emb2" / "failed.txt").read_text().splitlines()
    assert failures and all(line.startswith(f"{tmp_path}/shards/00001.tar\t") for line in failures)
    assert len(failures) == len((reference[0] / "failed.txt").read_text().splitlines())  # (all in shard 1)
    (tmp_path / "shards" / "00003.tar").write_bytes(data)  # the download, done again
    r = run_script(EMBED_SCRIPT, "--shards", pattern, "--output_folder", out, "--model", toy["model"],
                   "--batch-size", 16)
    assert r.returncode == 0 and "3 embedded before" in r.stdout, r.stderr
    assert not (out / "failed_shards.txt").exists()
    expected = outputs(reference[0])
    got = outputs(out)
    for n in range(3):
        for name in (f"img_emb/img_emb_{n}.npy", f"metadata/metadata_{n}.parquet"):
            assert got[Path(name)] == expected[Path(name)]
    assert got[Path("img_emb/img_emb_3.npy")] == expected[Path("img_emb/img_emb_0.npy")]  # shard 0's copy


def test_a_part_is_linked_into_the_layout_or_copied_where_the_file_system_has_no_links(tmp_path, monkeypatch):
    from dbpkit import shards

    url = "pipe:curl -s https://host/data/00007.tar"
    emb, meta, _, _ = shards.part_files(str(tmp_path), url)
    os.makedirs(os.path.dirname(emb))
    for folder in (shards.EMBEDDINGS_DIR, shards.METADATA_DIR):
        os.makedirs(tmp_path / folder)
    Path(emb).write_bytes(b"embeddings")
    Path(meta).write_bytes(b"metadata")
    shards.place_part(str(tmp_path), url, 5)
    placed = (tmp_path / "img_emb" / "img_emb_5.npy", tmp_path / "metadata" / "metadata_5.parquet")
    assert [os.stat(p).st_ino for p in placed] == [os.stat(emb).st_ino, os.stat(meta).st_ino]  # linked

    def no_links(source: str, target: str) -> None:  # (as on a file system without hard links)
        raise PermissionError(1, "Operation not permitted", target)

    monkeypatch.setattr(os, "link", no_links)
    shards.place_part(str(tmp_path), url, 6)
    placed = (tmp_path / "img_emb" / "img_emb_6.npy", tmp_path / "metadata" / "metadata_6.parquet")
    assert [p.read_bytes() for p in placed] == [b"embeddings", b"metadata"]  # copied
    assert os.stat(placed[0]).st_ino != os.stat(emb).st_ino and Path(emb).read_bytes() == b"embeddings"


def test_a_shard_regenerated_under_the_same_name_is_embedded_again(toy, reference, tmp_path):
    pattern = shard_copies(toy, tmp_path / "shards")
    proc = start_script(EMBED_SCRIPT, "--shards", pattern, "--output_folder", tmp_path / "emb", "--model",
                        toy["model"], "--batch-size", 16, "--workers", 2, pause="shard 1 embedded")
    wait_paused(proc, "shard 1 embedded")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    shard0 = tmp_path / "shards" / "00000.tar"
    stat = os.stat(shard0)
    other = (tmp_path / "shards" / "00002.tar").read_bytes()
    assert len(other) == stat.st_size  # (the same size: only the content tells them apart)
    shard0.write_bytes(other)  # regenerated: other images, the same name, size and mtime
    os.utime(shard0, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = embed({**toy, "pattern": pattern}, tmp_path / "emb")
    assert "1 embedded before" in r.stdout  # shard 1's part only
    got, expected = outputs(tmp_path / "emb"), outputs(reference[0])
    assert got[Path("img_emb/img_emb_0.npy")] == expected[Path("img_emb/img_emb_2.npy")]
    assert got[Path("img_emb/img_emb_1.npy")] == expected[Path("img_emb/img_emb_1.npy")]


def test_keys_no_key_file_can_hold_are_failed_samples_and_round_trip(toy, tmp_path):
    from dbpkit import shards

    image = make_toy_images.encoded(make_toy_images.make_image(np.random.default_rng(0)), "png")
    keys = ["plain", "tab\there", "new\nline", "carriage\rreturn", "back\\slash", "ünïcode/ok"]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))
    out = tmp_path / "emb"
    r = run_script(EMBED_SCRIPT, "--shards", tmp_path / "shards" / "00000.tar", "--output_folder", out, "--model",
                   toy["model"])
    assert r.returncode == 0 and "(3 without a decodable image)" in r.stdout, r.stderr
    assert pd.read_parquet(out / "metadata" / "metadata_0.parquet")["image_path"].tolist() == \
        ["plain", "back\\slash", "ünïcode/ok"]
    assert len((out / "failed.txt").read_text().splitlines()) == 3  # one line each
    failed = shards.read_failed(out / "failed.txt")
    assert [key for _, key, _ in failed] == ["tab\there", "new\nline", "carriage\rreturn"]
    assert [why for _, _, why in failed] == [f"its key holds {what}, which no key file can hold"
                                             for what in ("a tab", "a newline", "a carriage return")]
    r = run_script(CLUSTER_SCRIPT, "--embeddings", out / "img_emb", "--num_clusters", 1,
                   "--save_folder", tmp_path / "clusters")  # the next step takes every key published
    assert r.returncode == 0, r.stderr


def test_failed_txt_fields_round_trip():
    from hypothesis import given
    from hypothesis import strategies as st

    from dbpkit import shards

    @given(st.text(), st.text(alphabet=st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF) | st.characters()))
    def check(a, b):
        line = shards.failed_line(a, b, "why")
        assert line.count("\n") == 1 and line.count("\t") == 2
        fields = line.rstrip("\n").split("\t")
        assert [shards.unescape_field(f) for f in fields] == [a, b, "why"]
    check()


def loader_workers(pid):
    """The image-decoding processes of a run: its children (forked by torch's DataLoader)."""
    from conftest import descendants

    return descendants(pid)


def gone(pids):
    from conftest import process_state

    return all(process_state(pid) in (None, "Z") for pid in pids)


def start_embedding(toy, tmp_path):
    proc = start_script(EMBED_SCRIPT, "--shards", toy["pattern"], "--output_folder", tmp_path / "emb", "--model",
                        toy["model"], "--batch-size", 16, "--workers", 2, pause="decoding")
    wait_paused(proc, "decoding")
    workers = loader_workers(proc.pid)
    assert len(workers) == 2
    return proc, workers


def test_a_killed_run_leaves_no_decoding_worker_and_no_traceback(toy, tmp_path):
    from conftest import wait_until

    proc, workers = start_embedding(toy, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # the run only, as the OOM killer would
    proc.wait()
    wait_until(lambda: gone(workers), what="the decoding workers to end with the run")
    assert proc.stderr.read().strip() == ""  # not a word from the workers either


def test_sigterm_to_the_process_group_is_one_line(toy, tmp_path):
    proc, workers = start_embedding(toy, tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)  # what timeout(1) and batch schedulers send
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "terminated (SIGTERM)" in error_line(err) and "Exception ignored" not in err
    assert not (tmp_path / "emb" / "params.json").exists()


def test_a_decoding_worker_killed_from_outside_is_the_worker_died_line(toy, tmp_path):
    proc, workers = start_embedding(toy, tmp_path)
    os.kill(workers[0], signal.SIGKILL)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "an image-decoding worker died, killed from outside" in error_line(err)
    assert not (tmp_path / "emb" / "params.json").exists()


@pytest.mark.parametrize("fault", ["ctrl-c", "sigterm", "kill -9"])
def test_a_stalled_pipe_command_does_not_hold_the_run_when_it_is_stopped(toy, tmp_path, fault):
    """A shard from a pipe: command that stalls (cat of a FIFO no one writes to; a download that hangs): Ctrl-C
    (to the process group, as a terminal sends it) or SIGTERM (to the run) ends the run in one line, at once, with
    its workers and the commands they started; kill -9 of the run alone ends them too. Before, the run waited for
    the stalled worker without end; and a killed run's workers left their commands behind."""
    from conftest import DEADLINE, STOPS, session_is_empty, stalled_stream, wait_until

    send, sig, status, message = STOPS[fault]
    with stalled_stream(tmp_path) as (shard, read_by):
        proc = start_script(EMBED_SCRIPT, "--shards", shard, "--output_folder", tmp_path / "emb", "--model",
                            toy["model"], "--workers", 2, stderr=open(tmp_path / "err", "w"))
        try:
            read_by(proc)
            send(proc.pid, sig)
            assert proc.wait(timeout=DEADLINE) == status
            if message:
                assert message in error_line((tmp_path / "err").read_text())
            wait_until(lambda: session_is_empty(proc.pid), what="the workers and their commands to end")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_the_models_forward_pass_is_a_safe_point_before_every_layer(toy, monkeypatch):
    """A batch of a large model on the CPU takes minutes: Ctrl-C or SIGTERM recorded meanwhile stops it at the next
    layer. Here one recorded before the batch: the forward pass stops before any layer runs."""
    import signal as signals

    import torch

    from dbpkit import cli, encoder
    from dbpkit.errors import Terminated

    model = encoder.load_encoder(toy["model"], "cpu")
    ran = []
    for module in model.model.modules():
        module.register_forward_hook(lambda module, *_: ran.append(module))
    pixels = torch.zeros(2, 3, 224, 224)
    assert encoder.embed(model, pixels, False).shape[0] == 2 and ran  # (no signal: every layer runs)
    ran.clear()
    monkeypatch.setattr(cli, "_signals", [signals.SIGTERM])
    with pytest.raises(Terminated):
        encoder.embed(model, pixels, False)
    assert ran == []


def test_the_loaders_wait_is_a_safe_point_that_loses_no_sample(tmp_path, monkeypatch):
    """with_safe_points asks the loader again after each of its timeouts (a safe point each): the samples of a
    worker that makes the run wait (here until the third safe point opens its gate) all come, in order, once."""
    import time

    import torch.utils.data

    from dbpkit import shards

    gate = tmp_path / "gate"

    class Waiting(torch.utils.data.IterableDataset):
        def __iter__(self):
            while not gate.exists():
                time.sleep(0.001)
            yield from range(5)

    safe_points = []

    def check_stop() -> None:
        safe_points.append(1)
        if len(safe_points) == 3:
            gate.touch()
    monkeypatch.setattr(shards, "check_stop", check_stop)
    loader = torch.utils.data.DataLoader(Waiting(), batch_size=None, num_workers=1, timeout=0.01,
                                         multiprocessing_context="fork")
    assert list(shards.with_safe_points(iter(loader))) == [0, 1, 2, 3, 4]
    assert len(safe_points) >= 3


def test_shared_memory_that_is_full_ends_the_run_in_one_line(toy, reference, tmp_path):
    """The decoding workers hand images over in shared memory; where it is full (Docker's 64 MB /dev/shm; here
    files capped at 2000 bytes, an image's pixels are more), one line, the work kept, and the rerun finishes as a
    run with room does. Before, the worker's error was only printed and the run waited for the image without end."""
    from conftest import finished, limit_file_size

    out = tmp_path / "emb"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, EMBED_SCRIPT), "--shards", toy["pattern"],
                             "--output_folder", out, "--model", toy["model"], "--batch-size", "16", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=limit_file_size(2000))
    _, err = finished(proc)
    assert proc.returncode == 1, err
    line = error_line(err)
    assert line.startswith("error: shared memory is full: an image-decoding worker could not hand over an image (")
    assert line.endswith("free space in /dev/shm (with Docker: --shm-size), then rerun the same command"), line
    assert "Traceback" not in err and sorted(os.listdir(out)) == [".dbp_staging"]
    embed(toy, out, "--workers", 2)
    assert outputs(out) == outputs(reference[0])


def test_a_large_image_is_decoded_without_a_warning_and_a_bomb_is_a_failed_sample(toy, monkeypatch):
    import warnings

    from PIL import Image

    from dbpkit import encoder, shards

    image = make_toy_images.encoded(Image.new("RGB", (60, 50), (200, 30, 30)), "png")  # 3,000 pixels
    processor = encoder.load_processor(toy["model"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3,000 is past it, below twice it: PIL warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels, failure = shards.decoded({"png": image}, processor)
    assert failure is None and pixels is not None and caught == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice the limit: PIL refuses it
    pixels, failure = shards.decoded({"png": image}, processor)
    assert pixels is None and "DecompressionBombError" in failure
