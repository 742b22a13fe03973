"""The loader side: real webdataset shards filtered by the kept keys, in plain loops and in torch workers."""

import io
import os
import pickle
import re
import tarfile

import numpy as np
import pygtrie
import pytest
import webdataset as wds

import dbp_utils as du

SHARDS, PER_SHARD = 4, 25


def write_shard(path, members):
    """A webdataset tar shard: for every member name, a .jpg and a .cls file."""
    with tarfile.open(path, "w") as tar:
        for name in members:
            for ext, payload in ((".jpg", b"\xff\xd8fake"), (".cls", b"3")):
                info = tarfile.TarInfo(name + ext)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def make_shards(folder, with_shard=True, flat=False):
    """Shards 00000.tar .. and a random 40% of their keys written as a trie and as kept_keys.npy."""
    rng = np.random.default_rng(1)
    all_keys, urls = [], []
    for shard in range(SHARDS):
        stem = f"{shard:05d}"
        names = [f"{shard * 100 + i:09d}" for i in range(PER_SHARD)]
        # Style 1: `<shard stem>/<__key__>`; style 2: the tar member names carry the shard folder; flat: the
        # keys are the member names alone (clip-retrieval's image_path, LAION's key).
        members = names if with_shard or flat else [f"{stem}/{n}" for n in names]
        urls.append(str(folder / f"{stem}.tar"))
        write_shard(urls[-1], members)
        all_keys += names if flat else [f"{stem}/{n}" for n in names]
    kept = sorted(k for k in all_keys if rng.random() < 0.4)
    kept_bytes = np.array([k.encode() for k in kept])
    with open(folder / "trie.pkl", "wb") as f:
        du.write_trie(f, kept_bytes)
    np.save(folder / "kept.npy", kept_bytes)
    return urls, kept


def sample_key(sample):
    """The DBP key of a webdataset sample (module level: spawned loader workers import it)."""
    return f"{du.shard_stem(sample['__url__'])}/{sample['__key__']}"


@pytest.mark.parametrize("source", ["trie", "npy", "trie_path", "npy_path"])
@pytest.mark.parametrize("with_shard", [True, False])
def test_webdataset_filter_keeps_exactly_the_kept(tmp_path, source, with_shard):
    urls, kept = make_shards(tmp_path, with_shard)
    keys = {"trie": du.load_trie(str(tmp_path / "trie.pkl")), "npy": du.load_kept_keys(str(tmp_path / "kept.npy")),
            "trie_path": str(tmp_path / "trie.pkl"), "npy_path": tmp_path / "kept.npy"}[source]
    dataset = wds.WebDataset(urls, shardshuffle=False).select(du.webdataset_filter(keys, with_shard=with_shard))
    seen = [sample_key(s) if with_shard else s["__key__"] for s in dataset]
    assert seen == kept


@pytest.mark.parametrize("source", ["trie.pkl", "kept.npy"])
@pytest.mark.parametrize("style", ["shard/key", "members with folders", "flat"])
def test_the_default_filter_follows_the_kept_keys_form(tmp_path, source, style):
    """The README's one-liner, webdataset_filter(path), on every key form: exactly the kept samples pass."""
    urls, kept = make_shards(tmp_path, with_shard=style == "shard/key", flat=style == "flat")
    dataset = wds.WebDataset(urls, shardshuffle=False).select(du.webdataset_filter(tmp_path / source))
    seen = [s["__key__"] if style != "shard/key" else sample_key(s) for s in dataset]
    assert seen == kept and len(kept) > 0


@pytest.mark.parametrize("source", ["trie.pkl", "kept.npy"])
def test_a_filter_that_could_never_match_is_an_error_not_an_empty_data_set(tmp_path, source):
    (tmp_path / "flat").mkdir()
    make_shards(tmp_path / "flat", flat=True)
    with pytest.raises(ValueError, match="no kept key in .* holds a '/'"):
        du.webdataset_filter(tmp_path / "flat" / source, with_shard=True)
    urls, _ = make_shards(tmp_path)  # nested keys, members named by the bare key
    dataset = wds.WebDataset(urls, shardshuffle=False).select(du.webdataset_filter(tmp_path / source,
                                                                                   with_shard=False))
    with pytest.raises(ValueError, match="has no '/', but every kept key in .* has one"):
        next(iter(dataset))


class RunsCode:
    """What a crafted kept_keys_trie.pkl could hold: unpickling it would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_of_something_else_or_keys_of_another_form_are_refused(tmp_path):
    """A plain pickle of another object (safe to load, but no trie), and a kept_keys.npy that is not 1-D bytes."""
    other = tmp_path / "kept_keys_trie.pkl"
    other.write_bytes(pickle.dumps({"00000/000000001": 1}))
    with pytest.raises(du.UsageError, match=r"kept_keys_trie\.pkl: holds a dict, not a pygtrie\.StringTrie"):
        du.load_trie(str(other))
    for keys, form in ((np.array(["00000/000000001"]), "<U15 and shape (1,)"), (np.array([[b"a", b"b"]]),
                                                                                "|S1 and shape (1, 2)")):
        np.save(tmp_path / "kept_keys.npy", keys)
        with pytest.raises(du.UsageError, match=re.escape(f"kept_keys.npy: has dtype {form}; expected 1-D bytes")):
            du.load_kept_keys(str(tmp_path / "kept_keys.npy"))


def test_a_trie_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    evil = tmp_path / "kept_keys_trie.pkl"
    evil.write_bytes(pickle.dumps({"trie": RunsCode(marker)}))
    with pytest.raises(du.UsageError, match="asks to load posix.system, which a pygtrie trie never needs"):
        du.load_trie(str(evil))
    with pytest.raises(du.UsageError, match="is not a kept-key trie"):
        du.webdataset_filter(evil)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_trie_pickled_by_pygtrie_itself_loads(tmp_path, protocol):
    trie = pygtrie.StringTrie(separator="/")
    for key in ("00000/000000001", "00000/000000002", "00001/x", "flat"):
        trie[key] = 1
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(trie, protocol))
    assert du.load_trie(str(tmp_path / "t.pkl")) == trie


@pytest.mark.parametrize("keys", ["trie.pkl", "kept.npy"])
@pytest.mark.parametrize("loader", ["DataLoader", "WebLoader", "DataLoader spawn"])
def test_torch_loader_workers_yield_each_kept_sample_once(tmp_path, keys, loader):
    import torch.utils.data

    urls, kept = make_shards(tmp_path)
    # webdataset hands each loader worker its own shards; the filter travels to the workers by pickle.
    dataset = wds.WebDataset(urls, shardshuffle=False).select(du.webdataset_filter(tmp_path / keys)).map(sample_key)
    if loader == "WebLoader":
        batches = wds.WebLoader(dataset, batch_size=None, num_workers=2)
    else:
        context = "spawn" if loader.endswith("spawn") else None
        batches = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context)
    seen = list(batches)
    assert len(seen) == len(set(seen)) and sorted(seen) == kept


@pytest.mark.parametrize("form", ["pipe:cat {}", "pipe:cat {} || true", "pipe:cat '{}'", "pipe:dd if={} status=none"])
def test_pipe_shards_are_filtered_like_files(tmp_path, form):
    """Shards streamed by a command (from an object store, say) keep exactly the kept samples too."""
    urls, kept = make_shards(tmp_path)
    dataset = wds.WebDataset([form.format(u) for u in urls], shardshuffle=False)
    seen = [sample_key(s) for s in dataset.select(du.webdataset_filter(tmp_path / "kept.npy"))]
    assert seen == kept


@pytest.mark.parametrize("url", [
    "pipe:aws s3 cp s3://bucket/laion/00012.tar -", "pipe:curl -s -L https://host/data/00012.tar",
    "pipe:cat 00012.tar || true", "https://host/data/00012.tar?X-Amz-Signature=abc&x=1", "/data/00012.tar.gz",
    "gs://bucket/00012.tgz", "/data/my shards/00012.tar", "file:///data/00012.tar#frag"])
def test_shard_stem_of_every_url_form(url):
    assert du.shard_stem(url) == "00012"


def test_a_url_without_a_shard_name_fails_on_the_first_sample(tmp_path):
    urls, _ = make_shards(tmp_path)
    os.rename(urls[0], tmp_path / "shard-zero")
    dataset = wds.WebDataset([f"pipe:cat {tmp_path / 'shard-zero'}"], shardshuffle=False)
    with pytest.raises(ValueError, match="no shard name in __url__"):
        next(iter(dataset.select(du.webdataset_filter(tmp_path / "kept.npy"))))
