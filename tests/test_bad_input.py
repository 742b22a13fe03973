"""Every user mistake: exit 2, one line `error: <where>: <what> (<fix>)`, nothing on disk changed."""

import os
import shutil

import numpy as np
import pytest
from conftest import CPUS, DINTER_SCRIPT, DINTRA_SCRIPT, PRUNE_SCRIPT, error_line, run_script, write_npz_as

import dbp_utils as du

K, DIM = 4, 8
ALL = (DINTRA_SCRIPT, DINTER_SCRIPT, PRUNE_SCRIPT)
FOLDER_FLAG = {DINTRA_SCRIPT: "--sorted_clusters_path", DINTER_SCRIPT: "--sorted_clusters_path",
               PRUNE_SCRIPT: "--sorted-clusters-path"}
K_FLAG = {DINTRA_SCRIPT: "--num_clusters", DINTER_SCRIPT: "--num_clusters", PRUNE_SCRIPT: "--num-centroids"}
OUT_FLAG = {DINTRA_SCRIPT: "--avg_distance_to_cent_save_path", DINTER_SCRIPT: "--mean_centroid_distances_save_path",
            PRUNE_SCRIPT: "--save-dir"}


def good_layout(root):
    """SemDeDup's save folder (centroids + sorted clusters), score files, and a completed run."""
    sorted_dir = root / "save" / "sorted"
    sorted_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(root / "save" / "kmeans_centroids.npy", rng.standard_normal((K, DIM)).astype(np.float32))
    for j in range(K):
        dists = sorted(rng.uniform(0, 1, 5).tolist(), reverse=True)
        np.save(sorted_dir / f"cluster_{j}.npy", [(f"{j:05d}/{j}{i:04d}.jpg", 5 * j + i, d, j)
                                                  for i, d in enumerate(dists)])
    (root / "scores").mkdir()
    np.save(root / "scores" / "dintra.npy", rng.uniform(0, 1, K).astype(np.float32))
    np.save(root / "scores" / "dinter.npy", rng.uniform(0, 1, K).astype(np.float32))
    (root / "done").mkdir()
    for name in (du.PARAMS_FILE, du.QUOTAS_FILE, du.TRIE_FILE):
        (root / "done" / name).write_text("from an earlier run")
    (root / "blocker").write_text("a file where a folder is expected")


def args_for(script, root, **override):
    base = {
        DINTRA_SCRIPT: {"--num_clusters": K, "--sorted_clusters_path": root / "save/sorted",
                        "--avg_distance_to_cent_save_path": root / "out/dintra.npy"},
        DINTER_SCRIPT: {"--num_clusters": K, "--sorted_clusters_path": root / "save/sorted",
                        "--mean_centroid_distances_save_path": root / "out/dinter.npy"},
        PRUNE_SCRIPT: {"--num-centroids": K, "--mean_centroid_distances_save_path": root / "scores/dinter.npy",
                       "--avg_distance_to_cent_save_path": root / "scores/dintra.npy",
                       "--sorted-clusters-path": root / "save/sorted", "--total-dataset-size": 5 * K,
                       "--prune-ratio": 0.5, "--save-dir": root / "out/run"},
    }[script]
    for flag, value in override.items():
        flag = {"FOLDER": FOLDER_FLAG, "KFLAG": K_FLAG, "OUT": OUT_FLAG}.get(flag, {script: flag})[script]
        if value is None:
            base.pop(flag, None)
        else:
            base[flag] = value(root) if callable(value) else value
    return [str(a) for pair in base.items() for a in pair if a != ""]  # "" marks a flag without a value


def snapshot(root):
    """Every path under root, each file with its bytes and modification time (a folder's own time changes
    with what is made and removed in it, so only what it holds is compared)."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if name in dirs or os.path.islink(path):
                state[path] = None
            else:
                state[path] = (os.lstat(path).st_mtime_ns, open(path, "rb").read())
    return state


def save_cluster(rows, j=1):
    return lambda root: np.save(root / "save" / "sorted" / f"cluster_{j}.npy", rows)


def write_bytes(data, j=1):
    return lambda root: (root / "save" / "sorted" / f"cluster_{j}.npy").write_bytes(data)


def truncate(j=1):
    def go(root):
        path = root / "save" / "sorted" / f"cluster_{j}.npy"
        path.write_bytes(path.read_bytes()[:-40])
    return go


def remove(*parts):
    return lambda root: os.remove(root.joinpath(*parts))


def add_file(name):
    return lambda root: np.save(root / "save" / "sorted" / name, [("a.jpg", 0, 0.1, 9)])


def folder_named(name):
    def go(root):
        os.remove(root / "save" / "sorted" / name)
        os.mkdir(root / "save" / "sorted" / name)
    return go


def empty_folder(root):
    shutil.rmtree(root / "save" / "sorted")
    (root / "save" / "sorted").mkdir()


ROWS = [("a/1.jpg", 0, 0.5, 1), ("a/2.jpg", 1, 0.4, 1)]
# (id, scripts, setup, flag overrides, text the message must contain)
CASES = [
    ("missing-folder", ALL, None, {"FOLDER": lambda r: r / "nope"}, "does not exist"),
    ("folder-is-file", ALL, None, {"FOLDER": lambda r: r / "blocker"}, "is a file"),
    ("empty-folder", ALL, empty_folder, {}, "holds no cluster_<j>.npy"),
    ("gap-in-files", ALL, remove("save", "sorted", "cluster_2.npy"), {}, "missing cluster_2.npy"),
    ("gap-inferred-k", ALL, remove("save", "sorted", "cluster_1.npy"), {"KFLAG": None}, "missing cluster_1.npy"),
    ("k-larger-than-disk", ALL, None, {"KFLAG": 6}, "missing cluster_4.npy, cluster_5.npy"),
    ("k-smaller-than-disk", ALL, None, {"KFLAG": 3}, "unexpected cluster_3.npy"),
    ("k-zero", ALL, None, {"KFLAG": 0}, "less than 1"),
    ("k-not-int", ALL, None, {"KFLAG": "four"}, "invalid int value"),
    ("not-npy", ALL, write_bytes(b"path,index,distance\n"), {}, "is not a .npy file"),
    ("truncated", ALL, truncate(), {}, "truncated"),
    ("pickle-npy", ALL, lambda r: np.save(r / "save/sorted/cluster_1.npy", np.array([{"a": 1}]), allow_pickle=True),
     {}, "Python objects"),
    ("one-dim", ALL, save_cluster(np.array(["a.jpg", "b.jpg"])), {}, "2-D"),
    ("five-columns", ALL, save_cluster([("a.jpg", 0, 0.5, 1, "x")]), {}, "5 columns"),
    ("two-columns", ALL, save_cluster([("a.jpg", 0.5)]), {}, "2 columns"),
    ("numeric-file", ALL, save_cluster(np.zeros((3, 4))), {}, "expected a string array"),
    ("distance-text", (DINTRA_SCRIPT, PRUNE_SCRIPT), save_cluster([("a/1.jpg", 0, "far", 1), ROWS[1]]), {},
     "'far' is not a number"),
    ("distance-nan", (DINTRA_SCRIPT, PRUNE_SCRIPT), save_cluster([ROWS[0], ("a/2.jpg", 1, float("nan"), 1)]), {},
     "distance is nan"),
    ("distance-inf-middle", (DINTRA_SCRIPT,), save_cluster([ROWS[0], ("a/3.jpg", 1, float("inf"), 1), ROWS[1]]),
     {}, "row 1: distance is inf"),
    # Among the rows prune keeps (a prefix of a descending file), and over a completed run it must not harm.
    ("distance-nan-kept", (PRUNE_SCRIPT,), save_cluster([ROWS[0], ("a/3.jpg", 1, float("nan"), 1)] + ROWS[1:] * 3),
     {"--save-dir": lambda r: r / "done", "--overwrite": ""}, "row 1: distance is nan"),
    ("out-under-file", ALL, None, {"OUT": lambda r: r / "blocker/out"}, "is a file"),
    ("out-is-folder", (DINTRA_SCRIPT, DINTER_SCRIPT), None, {"OUT": lambda r: r / "scores"}, "is a folder"),
    ("centroids-missing", (DINTER_SCRIPT,), remove("save", "kmeans_centroids.npy"), {}, "no kmeans_centroids.npy"),
    ("centroids-1d", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy", np.ones(8)), {},
     "2-D (k, dim)"),
    ("centroids-count", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy", np.ones((5, 8))), {},
     "holds 5 centroids but there are 4 clusters"),
    ("centroids-zero", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy",
                                                           np.eye(4, 8) * [[1], [1], [0], [1]]), {}, "all zeros"),
    ("centroids-nan", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy",
                                                          np.where(np.eye(4, 8), np.nan, 1.0)), {}, "not finite"),
    ("centroids-pickle", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy",
                                                             np.array([None] * 4), allow_pickle=True), {},
     "Python objects"),
    ("dim-mismatch", (DINTER_SCRIPT,), None, {"--dim": 16}, "--dim: is 16 but"),
    ("num-nns-zero", (DINTER_SCRIPT,), None, {"--num_NNs": 0}, "--num_NNs: 0 is less than 1"),
    ("dintra-length", (PRUNE_SCRIPT,), lambda r: np.save(r / "scores/dintra.npy", np.ones(3, np.float32)), {},
     "shape (3,) but there are 4 clusters"),
    ("dinter-dtype", (PRUNE_SCRIPT,), lambda r: np.save(r / "scores/dinter.npy", np.ones(4, np.int64)), {},
     "expected floats"),
    ("dinter-missing", (PRUNE_SCRIPT,), remove("scores", "dinter.npy"), {}, "cannot be read"),
    # --overwrite of a file the run reads (a cluster file, the centroids; through a link too): it would be replaced
    ("out-over-a-cluster-file", (DINTRA_SCRIPT, DINTER_SCRIPT), None,
     {"OUT": lambda r: r / "save/sorted/cluster_2.npy", "--overwrite": ""}, "cluster_2.npy is a file this run reads"),
    ("out-over-the-centroids", (DINTER_SCRIPT,), lambda r: os.symlink(r / "save/kmeans_centroids.npy", r / "link.npy"),
     {"OUT": lambda r: r / "link.npy", "--overwrite": ""}, "link.npy is a file this run reads"),
    ("dintra-empty", (PRUNE_SCRIPT,), lambda r: (r / "scores/dintra.npy").write_bytes(b""), {},
     "dintra.npy: is empty, not a .npy file"),
    ("dintra-inf", (PRUNE_SCRIPT,), lambda r: np.save(r / "scores/dintra.npy", np.array([1, np.inf, 1, 1])), {},
     "infinite"),
    ("dintra-not-given", (PRUNE_SCRIPT,), None, {"--avg_distance_to_cent_save_path": None},
     "required by --density"),
    ("ratio-zero", (PRUNE_SCRIPT,), None, {"--prune-ratio": 0}, "--prune-ratio: 0.0 is outside (0, 1]"),
    ("ratio-above-one", (PRUNE_SCRIPT,), None, {"--prune-ratio": 1.5}, "outside (0, 1]"),
    ("ratio-nan", (PRUNE_SCRIPT,), None, {"--prune-ratio": "nan"}, "outside (0, 1]"),
    ("ratio-text", (PRUNE_SCRIPT,), None, {"--prune-ratio": "most"}, "--prune-ratio: invalid float value"),
    ("temperature-zero", (PRUNE_SCRIPT,), None, {"--temperature": 0}, "--temperature"),
    ("temperature-negative", (PRUNE_SCRIPT,), None, {"--temperature": -1}, "--temperature"),
    ("cls-bal-negative", (PRUNE_SCRIPT,), None, {"--cls-bal-ratio": -0.1}, "--cls-bal-ratio"),
    ("cls-bal-above-one", (PRUNE_SCRIPT,), None, {"--cls-bal-ratio": 1.5}, "--cls-bal-ratio"),
    ("target-above-data", (PRUNE_SCRIPT,), None, {"--total-dataset-size": 100, "--prune-ratio": 0.5},
     "asks to keep 50 samples but the clusters hold only 20"),
    ("total-zero", (PRUNE_SCRIPT,), None, {"--total-dataset-size": 0}, "--total-dataset-size"),
    ("which-bogus", (PRUNE_SCRIPT,), None, {"--which-to-keep": "medium"}, "invalid choice"),
    ("density-bogus", (PRUNE_SCRIPT,), None, {"--density": "entropy"}, "invalid choice"),
    ("workers-zero", ALL, None, {"--workers": 0}, "--workers"),
    ("workers-past-the-cpus", ALL, None, {"--workers": 10**20},
     f"--workers: {10**20} is more than 4 for each of this machine's {CPUS} CPUs"),
    ("save-dir-done", (PRUNE_SCRIPT,), None, {"--save-dir": lambda r: r / "done"}, "completed run"),
    ("save-dir-is-file", (PRUNE_SCRIPT,), None, {"--save-dir": lambda r: r / "blocker"}, "is a file"),
    ("unknown-flag", ALL, None, {"--colour": "blue"}, "unrecognized"),
    # Hostile sizes and values: reported at once, never built up in memory, never an internal error.
    ("stray-huge-file", ALL, add_file("cluster_400000000.npy"), {"KFLAG": None},
     "missing cluster_4.npy, cluster_5.npy, cluster_6.npy, cluster_7.npy, cluster_8.npy and 399999991 more"),
    ("k-huge", ALL, None, {"KFLAG": 10**12}, "missing cluster_4.npy, cluster_5.npy, cluster_6.npy, cluster_7.npy, "
     "cluster_8.npy and 999999999991 more"),
    ("seed-negative", (PRUNE_SCRIPT,), None, {"--seed": -1, "--which-to-keep": "random"}, "--seed: -1 is negative"),
    ("key-surrogate", (PRUNE_SCRIPT,), save_cluster([("a/\udcff.jpg", 0, 0.5, 1)] + ROWS[1:]), {},
     "row 0: key 'a/\\udcff.jpg' is not valid Unicode"),
    ("key-newline", (PRUNE_SCRIPT,), save_cluster([("a/1\n2.jpg", 0, 0.5, 1)] + ROWS[1:]), {},
     "row 0: key 'a/1\\n2.jpg' holds a newline"),
    ("key-tab", (PRUNE_SCRIPT,), save_cluster([("a/1\t2.jpg", 0, 0.5, 1)] + ROWS[1:]), {},
     "row 0: key 'a/1\\t2.jpg' holds a tab"),
    ("key-carriage-return", (PRUNE_SCRIPT,), save_cluster([ROWS[0], ("a/1\r2.jpg", 1, 0.4, 1)]), {},
     "row 1: key 'a/1\\r2.jpg' holds a carriage return"),
    ("key-nul", (PRUNE_SCRIPT,), save_cluster([("ab\0cd.jpg", 0, 0.5, 1)] + ROWS[1:]), {},
     "row 0: key 'ab\\x00cd.jpg' holds a NUL"),
    ("key-bytes-not-utf8", (PRUNE_SCRIPT,),
     save_cluster(np.array([(b"a/\xff\xfe.jpg", b"0", b"0.5", b"1")]
                           + [tuple(str(v).encode() for v in r) for r in ROWS[1:]])),
     {}, "row 0: key b'a/\\xff\\xfe.jpg' is not UTF-8"),
    ("save-dir-dangling-link", (PRUNE_SCRIPT,), lambda r: os.symlink(r / "gone", r / "link"),
     {"--save-dir": lambda r: r / "link"}, "is a symbolic link to"),
    ("centroids-none", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy", np.zeros((0, DIM))),
     {"FOLDER": None, "KFLAG": None, "--centroids_file": lambda r: r / "save/kmeans_centroids.npy"}, "no centroids"),
    ("complexity-overflow", (PRUNE_SCRIPT,), lambda r: [np.save(r / f"scores/{name}.npy", np.full(K, 1e200))
                                                        for name in ("dintra", "dinter")], {}, "overflows"),
    ("dintra-too-large", (DINTRA_SCRIPT,), save_cluster([(f"a/{i}.jpg", i, 1e308, 1) for i in range(3)]), {},
     "mean distance 1e+308 is too large for d_intra's float32"),
    ("cluster-is-folder", ALL, folder_named("cluster_1.npy"), {}, "cluster_1.npy: is a folder, not a .npy file"),
    ("cluster-is-npz", ALL, lambda r: write_npz_as(r / "save" / "sorted" / "cluster_1.npy"), {},
     "cluster_1.npy: is not a .npy file (it is a zip of arrays, an .npz)"),
    ("centroids-text", (DINTER_SCRIPT,), lambda r: np.save(r / "save/kmeans_centroids.npy", np.full((K, DIM), "a")),
     {}, "has dtype <U1; centroids are numbers"),
]


@pytest.mark.parametrize("script,setup,override,expect", [
    pytest.param(script, setup, override, expect, id=f"{script.split('_')[0].removesuffix('.py')}-{case_id}")
    for case_id, scripts, setup, override, expect in CASES for script in scripts])
def test_bad_input(tmp_path, script, setup, override, expect):
    good_layout(tmp_path)
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path)
    r = run_script(script, *args_for(script, tmp_path, **override))
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = error_line(r.stderr)
    assert expect in line
    assert line.endswith(")"), "the message says what to do, in parentheses"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", ALL)
def test_good_layout_runs(tmp_path, script):
    good_layout(tmp_path)
    r = run_script(script, *args_for(script, tmp_path))
    assert r.returncode == 0, r.stderr


def test_debug_shows_the_traceback(tmp_path):
    good_layout(tmp_path)
    r = run_script(PRUNE_SCRIPT, *args_for(PRUNE_SCRIPT, tmp_path, **{"--prune-ratio": 2}), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "UsageError" in r.stderr


def test_lower_bounds_above_target_is_a_clear_error():
    # Unreachable from the CLI (ratio <= 1 keeps sum(lb) <= N), so exercised directly.
    with pytest.raises(du.MethodError, match="^cls_bal_ratio: .*needs 20 samples"):
        du.solve_quotas(np.full(4, 0.25), np.array([10, 10, 10, 10]), 10, 2.0)


def torch_sees_a_gpu() -> bool:
    import subprocess
    import sys

    probe = "import torch; print(torch.cuda.is_available())"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


@pytest.mark.parametrize("script, flags", [
    ("deduplicate.py", ["--sorted_clusters_path", "SORTED", "--embeddings", "emb.npy", "--eps", "0.05",
                        "--save_folder", "OUT"]),
    ("compute_embeddings.py", ["--shards", "shards/{00000..00001}.tar", "--output_folder", "OUT",
                               "--model", "facebook/dinov2-small"]),
])
def test_device_cuda_without_a_gpu_is_one_line_and_nothing_written(tmp_path, script, flags):
    if torch_sees_a_gpu():
        pytest.skip("this machine has a CUDA device")
    r = run_script(script, *flags, "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr) == ("error: --device: cuda was asked for, but torch sees no CUDA device "
                                    "(pass --device cpu, or run where a GPU is)")
    assert os.listdir(tmp_path) == []


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """Asked of dbpkit.savedir directly: an empty output flag, and a folder the user may not write to (root may
    write anywhere, so the system's answer is stood in for)."""
    from dbpkit import savedir

    with pytest.raises(du.UsageError, match="^--avg_distance_to_cent_save_path: is required"):
        savedir.check_output_file("", "--avg_distance_to_cent_save_path", False, [])
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(du.UsageError, match=f"^--save_folder: {tmp_path} is not writable"):
        savedir.check_creatable(str(tmp_path / "new" / "out"), "--save_folder")


def test_a_stopped_runs_work_is_refused_to_a_run_with_other_flags_not_thrown_away(tmp_path):
    """Asked of dbpkit.savedir directly: the staged work of a stopped run, and a rerun whose inputs or flags differ
    (its `resume`). Refused, naming what differs, the work left as it was and the folder free for the run it
    belongs to; with --overwrite the new run starts afresh; the same `resume` goes on from it."""
    import json

    from dbpkit import savedir

    save = tmp_path / "out"
    stopped = {"files": "sha256:aa", "batch_size": 256, "model": {"name": "m", "dim": 8},
               "flags": {"seed": 1, "niter": 20, "k_sweep": [2, 3]}}
    staging = save / savedir.STAGING_DIR
    (staging / "img_emb").mkdir(parents=True)
    (staging / savedir.MANIFEST).write_text(json.dumps(stopped))
    (staging / "img_emb" / "img_emb_0.npy").write_bytes(b"two days of a GPU")

    class Stopped(Exception):
        pass

    def enter(resume, overwrite=False):  # a run of the resumable kind that is stopped again at once: what it found
        with pytest.raises(Stopped):
            with savedir.SaveDir(str(save), overwrite, ("img_emb", "params.json"), "params.json", "--output_folder",
                                 resume=resume) as out:
                found = out.resumed, sorted(os.listdir(out.staging))
                raise Stopped
        return found

    other = {**stopped, "files": "sha256:bb", "batch_size": 512, "flags": {"seed": 2, "niter": 20, "k_sweep": [2]}}
    with pytest.raises(du.UsageError) as refused:
        enter(other)
    assert str(refused.value) == (
        f"--output_folder: {save} holds the unfinished work of a stopped run that differs in --batch_size, the input "
        "files' content, --k_sweep, --seed (rerun that run's command to finish it, or pass --overwrite to discard its "
        "work and start afresh)")
    assert (staging / "img_emb" / "img_emb_0.npy").read_bytes() == b"two days of a GPU"
    assert json.loads((staging / savedir.MANIFEST).read_text()) == stopped
    with pytest.raises(du.UsageError, match=r"differs in --model \(rerun"):
        enter({**stopped, "model": {"name": "m", "dim": 16}})
    (staging / savedir.MANIFEST).unlink()  # a staging folder with work and no record of what it was made from
    with pytest.raises(du.UsageError, match=r"differs in inputs or flags \(it left no record of them\)"):
        enter(stopped)
    (staging / savedir.MANIFEST).write_text(json.dumps(stopped))
    # The lock was let go each time: the run the work belongs to goes on from it.
    assert enter(json.loads(json.dumps(stopped))) == (True, ["img_emb", savedir.MANIFEST])
    assert enter(other, overwrite=True) == (False, [savedir.MANIFEST])  # afresh: the stopped run's work is gone
    # A staging folder holding only its manifest (a run stopped before any work) is no obstacle.
    assert enter(stopped) == (False, [savedir.MANIFEST])


def test_a_cluster_file_cut_short_after_it_was_scanned_is_one_clear_error(tmp_path):
    """A file that changes between the scan of its header and the read of its rows (rewritten by another job), or
    goes."""
    from dbpkit.clusters import scan_clusters

    good_layout(tmp_path)
    clusters = scan_clusters(str(tmp_path / "save" / "sorted"), K, "--sorted_clusters_path", "--num_clusters")
    path = tmp_path / "save" / "sorted" / "cluster_2.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(du.UsageError, match=r"cluster_2\.npy: cannot be read \(.*\) \(the file changed or is damaged"):
        clusters[2].columns(("key",), 0, clusters[2].rows)
    # One removed since: the system's error, naming the file (on Ray, a task says its node cannot see it)
    (tmp_path / "save" / "sorted" / "cluster_3.npy").unlink()
    with pytest.raises(FileNotFoundError) as gone:
        clusters[3].columns(("key",), 0, clusters[3].rows)
    assert gone.value.filename == str(tmp_path / "save" / "sorted" / "cluster_3.npy")
