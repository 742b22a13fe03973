"""cluster_embeddings.py: every layout in, SemDeDup's sorted clusters out, checked against numpy and faiss."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import (
    CLUSTER_SCRIPT,
    DEADLINE,
    ROOT,
    error_line,
    finished,
    make_toy_clusters,
    run_script,
    start_script,
    wait_paused,
    write_npz_as,
)

N, DIM, K = 3000, 16, 12


def embeddings(n=N, seed=0):
    """Image-like unit vectors around concepts, scaled by a random factor per row (they are normalised as read)."""
    x = make_toy_clusters.make_embeddings(n, DIM, concepts=8, seed=seed).astype(np.float64)
    return x * np.random.default_rng(seed).uniform(0.5, 3, (n, 1))


def key_of(i):
    return f"{i // 500:05d}/{i:09d}.jpg"


def write_parquet(path, **columns):
    pd.DataFrame(columns).to_parquet(path)


def layout(root, kind, x, dtype=np.float32):
    """Write x in one of the layouts users hold; returns the flags that point at it and the keys in row order."""
    keys = [key_of(i) for i in range(len(x))]
    if kind in ("npy+txt", "npy+npy", "npy+parquet"):
        np.save(root / "emb.npy", x.astype(dtype))
        if kind == "npy+txt":
            (root / "keys.txt").write_text("".join(k + "\n" for k in keys))
            return ["--embeddings", root / "emb.npy", "--keys", root / "keys.txt"], keys
        if kind == "npy+npy":
            np.save(root / "keys.npy", np.array(keys))
            return ["--embeddings", root / "emb.npy", "--keys", root / "keys.npy"], keys
        write_parquet(root / "keys.parquet", sample=keys, caption=["a photo"] * len(keys))
        return ["--embeddings", root / "emb.npy", "--keys", root / "keys.parquet", "--key-column", "sample"], keys
    if kind == "clip-retrieval":  # 12 parts of uneven size, numbered 0..11 without zero padding
        (root / "img_emb").mkdir()
        (root / "metadata").mkdir()
        bounds = np.linspace(0, len(x), 13).astype(int)
        bounds[5] += 7
        for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            np.save(root / "img_emb" / f"img_emb_{n}.npy", x[a:b].astype(dtype))
            write_parquet(root / "metadata" / f"metadata_{n}.parquet", image_path=keys[a:b], key=list(range(a, b)),
                          url=[f"https://host/{i}.jpg" for i in range(a, b)])
        return ["--embeddings", root / "img_emb"], keys
    if kind == "datacomp":
        keys = [f"{(i * 2654435761) % (1 << 64):016x}{i:016x}" for i in range(len(x))]  # 32-hex uids
        (root / "shards").mkdir()
        for s, a in enumerate(range(0, len(x), 700)):
            np.savez(root / "shards" / f"{s:08d}.npz", l14_img=x[a:a + 700].astype(dtype), b32_img=np.zeros((1, 2)))
            write_parquet(root / "shards" / f"{s:08d}.parquet", uid=keys[a:a + 700], text=["t"] * len(keys[a:a + 700]))
        return ["--embeddings", root / "shards"], keys
    raise ValueError(kind)


def read_output(save):
    centroids = np.load(save / "kmeans_centroids.npy")
    files = sorted(os.listdir(save / "sorted_clusters"), key=lambda n: int(n[8:-4]))
    assert files == [f"cluster_{j}.npy" for j in range(len(centroids))]
    return centroids, [np.load(save / "sorted_clusters" / name) for name in files]


def check_output(save, x, keys, descending=True, spherical=True):
    """Every row once with its key and index; column 3 is j; sorted as asked; distances are 1 - cosine to
    the written centroid and each row's cluster is its nearest centroid, all from numpy."""
    centroids, clusters = read_output(save)
    assert centroids.dtype == np.float32 and centroids.shape == (K, DIM)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = centroids.astype(np.float64)
    cosine = unit @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    seen = np.zeros(len(x), int)
    for j, rows in enumerate(clusters):
        if rows.size == 0:
            assert rows.shape == (0,) and rows.dtype == np.float64
            continue
        assert rows.dtype.kind == "U" and rows.shape[1] == 4
        index = rows[:, 1].astype(int)
        seen[index] += 1
        assert rows[:, 0].tolist() == [keys[i] for i in index]
        assert (rows[:, 3] == str(j)).all()
        d = rows[:, 2].astype(np.float64)
        assert (np.diff(d) <= 0).all() if descending else (np.diff(d) >= 0).all()
        np.testing.assert_allclose(d, 1 - cosine[index, j], atol=2e-6)
        if spherical:  # nearest by cosine
            assert (cosine[index, j] >= cosine[index].max(axis=1) - 1e-6).all()
        else:  # nearest by L2 distance to the raw centroid
            l2 = ((unit[index, None, :] - c[None]) ** 2).sum(axis=2)
            assert (l2[:, j] <= l2.min(axis=1) + 1e-6).all()
    assert (seen == 1).all()
    return centroids, clusters


@pytest.mark.parametrize("kind", ["npy+txt", "npy+npy", "npy+parquet", "clip-retrieval", "datacomp"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_every_layout_gives_semdedups_sorted_clusters(tmp_path, kind, dtype):
    x = embeddings()
    flags, keys = layout(tmp_path, kind, x, dtype)
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", tmp_path / "save")
    assert r.returncode == 0, r.stderr
    check_output(tmp_path / "save", x.astype(dtype).astype(np.float64), keys)
    assert f"clustered {N} rows (dim {DIM}" in r.stdout
    params = json.loads((tmp_path / "save" / "clustering.json").read_text())
    assert params["rows"] == N and params["num_clusters"] == K and params["sample_size"] == N
    columns = {"npy+parquet": "sample", "clip-retrieval": "image_path", "datacomp": "uid"}
    assert params["key_column"] == columns.get(kind)


def test_kmeans_is_as_good_as_faiss_run_directly(tmp_path):
    import faiss

    x = embeddings()
    flags, keys = layout(tmp_path, "npy+txt", x)
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", tmp_path / "save", "--niter", 25)
    assert r.returncode == 0, r.stderr
    centroids, _ = check_output(tmp_path / "save", x.astype(np.float32).astype(np.float64), keys)
    unit = x.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    direct = faiss.Kmeans(DIM, K, niter=25, seed=1234, spherical=True, max_points_per_centroid=N)
    direct.train(unit)

    def objective(c):  # spherical k-means maximises the summed cosine to the nearest centroid
        c = c.astype(np.float64) / np.linalg.norm(c, axis=1, keepdims=True)
        return (unit.astype(np.float64) @ c.T).max(axis=1).sum()
    assert objective(centroids) >= objective(direct.centroids) - 1e-6 * N


def test_plain_kmeans_and_ascending_order(tmp_path):
    x = embeddings()
    flags, keys = layout(tmp_path, "npy+txt", x)
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", tmp_path / "save", "--no-spherical",
                   "--ascending", "--sample-size", 1000, "--seed", 7)
    assert r.returncode == 0, r.stderr
    check_output(tmp_path / "save", x.astype(np.float32).astype(np.float64), keys, descending=False, spherical=False)
    params = json.loads((tmp_path / "save" / "clustering.json").read_text())
    assert params["spherical"] is False and params["ascending"] is True and params["sample_size"] == 1000


def test_workers_and_threads_do_not_change_a_byte(tmp_path):
    """Large enough that BLAS would split its sums differently by thread count (it did: the distances' last
    digits and the k-means objective differed between --workers 1 and 2)."""
    x = make_toy_clusters.make_embeddings(40_000, 64, concepts=30, seed=4)
    flags, _ = layout(tmp_path, "clip-retrieval", x)
    outputs = []
    for workers, threads in (("1", "1"), ("2", "2"), ("2", "1")):
        save = tmp_path / f"save{workers}{threads}"
        r = subprocess.run([sys.executable, os.path.join(ROOT, CLUSTER_SCRIPT), *map(str, flags), "--num_clusters",
                            "50", "--niter", "5", "--save_folder", save, "--workers", workers],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        assert r.returncode == 0, r.stderr
        outputs.append({p.relative_to(save): p.read_bytes() for p in save.rglob("*")
                        if p.is_file() and p.name != "logs.log"})  # (the log holds the command line and times)
    assert outputs[0] == outputs[1] == outputs[2]


def test_killed_run_is_finished_by_a_rerun_without_redoing_clusters(tmp_path):
    x = make_toy_clusters.make_embeddings(8000, DIM, concepts=40, seed=1)
    flags, keys = layout(tmp_path, "npy+txt", x)
    args = [*flags, "--num_clusters", 60, "--niter", 5]
    r = run_script(CLUSTER_SCRIPT, *args, "--save_folder", tmp_path / "reference")
    assert r.returncode == 0, r.stderr
    save = tmp_path / "save"
    proc = start_script(CLUSTER_SCRIPT, *args, "--save_folder", save, "--workers", 2, pause="write under way")
    wait_paused(proc, "write under way")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    staged = save / ".dbp_staging" / "sorted_clusters"
    assert not (save / "sorted_clusters").exists() and not (save / "clustering.json").exists()
    done = {name: (staged / name).stat().st_mtime_ns for name in os.listdir(staged) if not name.startswith(".")}
    assert done, "the run wrote a cluster file before it reached the stage"
    r = run_script(CLUSTER_SCRIPT, *args, "--seed", 7, "--save_folder", save)
    assert r.returncode == 2 and "holds the unfinished work of a stopped run that differs in --seed (rerun that " \
        "run's command" in error_line(r.stderr)  # its clusters kept for it, not redone (below):
    r = run_script(CLUSTER_SCRIPT, *args, "--save_folder", save)
    assert r.returncode == 0, r.stderr
    assert f"resumed a stopped run; done before: the keys, k-means, the assignment, {len(done)} of 60" in r.stdout
    assert {name: (save / "sorted_clusters" / name).stat().st_mtime_ns for name in done} == done  # not redone
    assert sorted(os.listdir(save)) == sorted(os.listdir(tmp_path / "reference"))
    for path in (tmp_path / "reference").rglob("*.npy"):
        assert (save / path.relative_to(tmp_path / "reference")).read_bytes() == path.read_bytes(), path


def test_tiny_clusters_are_warned_about(tmp_path):
    flags, _ = layout(tmp_path, "npy+txt", embeddings(300))
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", 100, "--save_folder", tmp_path / "save")
    assert r.returncode == 0, r.stderr
    sizes = [len(np.load(tmp_path / "save" / "sorted_clusters" / f"cluster_{j}.npy")) for j in range(100)]
    single, empty = sizes.count(1), sizes.count(0)
    assert single + empty > 0  # 3 rows a cluster: some are bound to be tiny
    assert f"warning: {single} of 100 clusters hold a single row and {empty} none" in r.stderr
    log = (tmp_path / "save" / "logs.log").read_text()  # the warning stays with the run
    assert f"WARNING {single} of 100 clusters hold a single row and {empty} none" in log
    params = json.loads((tmp_path / "save" / "clustering.json").read_text())
    assert params["single_row_clusters"] == single and params["empty_clusters"] == empty
    assert params["key_column"] is None  # a .txt of keys has no column


def test_completed_folder_is_refused(tmp_path):
    x = embeddings()
    flags, keys = layout(tmp_path, "npy+txt", x)
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", tmp_path / "save")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "save" / "logs.log").read_text().splitlines()
    assert log[0].endswith(f"cluster_embeddings.py {' '.join(map(str, flags))} --num_clusters {K} --save_folder "
                           f"{tmp_path / 'save'} --workers 2")  # the command as run
    assert "finished after" in log[-1]
    before = (tmp_path / "save" / "kmeans_centroids.npy").read_bytes()
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K + 1, "--save_folder", tmp_path / "save")
    assert r.returncode == 2 and "already holds the outputs of a completed run" in r.stderr
    assert (tmp_path / "save" / "kmeans_centroids.npy").read_bytes() == before
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K + 1, "--save_folder", tmp_path / "save", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "save" / "sorted_clusters")) == K + 1


def test_a_disk_filling_up_as_the_keys_are_gathered_ends_in_one_line_and_the_rerun_finishes(tmp_path, small_disk):
    """3,000 keys of 19 bytes: their chunk (14 pages) fits on the disk, the keys' file beside it (14 more) does not. It
    was written through a memory mapping, and the run died of a SIGBUS without a word."""
    flags, _ = layout(tmp_path, "npy+txt", embeddings())
    save = small_disk / "save"
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", save)
    assert r.returncode == 1, r.stderr
    assert error_line(r.stderr).startswith(f"error: {save}") and "No space left on device" in r.stderr, r.stderr
    subprocess.run(["mount", "-o", "remount,size=4m", small_disk], check=True)  # space freed
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", save)
    assert r.returncode == 0, r.stderr
    assert run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", K, "--save_folder", tmp_path / "whole").returncode == 0
    for name in ["kmeans_centroids.npy"] + [f"sorted_clusters/cluster_{j}.npy" for j in range(K)]:
        assert (save / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_overwrite_replaces_an_output_of_another_kind(tmp_path):
    """A file where the sorted_clusters folder goes (or a folder where a file goes) is no obstacle to --overwrite,
    and nothing is published until all of it can be."""
    flags, keys = layout(tmp_path, "npy+txt", embeddings(600))
    save = tmp_path / "save"
    save.mkdir()
    (save / "sorted_clusters").write_text("not a folder")
    (save / "kmeans_centroids.npy").mkdir()
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", 4, "--save_folder", save)
    assert r.returncode == 2 and "already holds" in r.stderr
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", 4, "--save_folder", save, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(save)) == ["clustering.json", "clusters.png", "kmeans_centroids.npy", "logs.log",
                                        "sorted_clusters"]
    assert np.load(save / "kmeans_centroids.npy").shape == (4, DIM) and len(os.listdir(save / "sorted_clusters")) == 4


def bad(kind, change):
    """A layout, then a change that makes it wrong."""
    def go(root):
        flags, _ = layout(root, kind, embeddings(300))
        change(root, flags)
        return flags
    return go


def set_row(path_name, row, value):
    def change(root, flags):
        x = np.load(root / path_name)
        x[row] = value
        np.save(root / path_name, x)
    return change


NULL_AT_205 = [None if i == 205 else f"k{i}" for i in range(300)]
BAD = [  # (id, setup, extra flags, what the one line says)
    ("missing", lambda root: ["--embeddings", root / "nope.npy", "--keys", root / "k.txt"], [], "does not exist"),
    ("no-rows", bad("npy+txt", lambda r, f: np.save(r / "emb.npy", np.zeros((0, DIM), np.float32))), [],
     "holds no rows"),
    ("integers", bad("npy+txt", lambda r, f: np.save(r / "emb.npy", np.ones((300, DIM), np.int32))), [],
     "dtype int32"),
    ("ragged", bad("npy+txt", lambda r, f: np.save(r / "emb.npy", np.array([[1.0], [1.0, 2.0]], dtype=object),
                                                   allow_pickle=True)), [], "Python objects"),
    ("nan-row", bad("npy+txt", set_row("emb.npy", 123, np.nan)), [], "row 123: embedding is not finite"),
    ("inf-row", bad("npy+txt", set_row("emb.npy", 299, np.inf)), [], "row 299: embedding is not finite"),
    ("zero-row", bad("npy+txt", set_row("emb.npy", 7, 0)), [], "row 7: embedding is all zeros"),
    ("k-above-rows", bad("npy+txt", lambda r, f: None), ["--num_clusters", 301], "301 is not between 1 and the 300"),
    ("dim-mismatch", bad("clip-retrieval", lambda r, f: np.save(r / "img_emb" / "img_emb_3.npy",
                                                                np.ones((25, DIM + 1), np.float32))), [],
     "has dimension 17 but"),
    ("txt-too-short", bad("npy+txt", lambda r, f: (r / "keys.txt").write_text("a\nb\n")), [],
     "holds 2 keys but"),
    ("parquet-mismatch", bad("clip-retrieval", lambda r, f: write_parquet(r / "metadata" / "metadata_4.parquet",
                                                                          image_path=["x"] * 3)), [],
     "metadata_4.parquet: holds 3 keys but"),
    ("metadata-missing", bad("clip-retrieval", lambda r, f: os.remove(r / "metadata" / "metadata_11.parquet")), [],
     "part 11 has no partner"),
    ("wrong-key-column", bad("npy+parquet", lambda r, f: None), ["--key-column", "path"], "has no column 'path'"),
    ("keys-with-datacomp", bad("datacomp", lambda r, f: None), ["--keys", "x.txt"], "--keys: is not used"),
    ("npz-key", bad("datacomp", lambda r, f: None), ["--npz-key", "b16_img"], "holds no array 'b16_img'"),
    ("no-k", bad("npy+txt", lambda r, f: None), ["--num_clusters", None], "--num_clusters: is required"),
    ("ambiguous-parts", bad("clip-retrieval", lambda r, f: shutil.copy(r / "img_emb" / "img_emb_3.npy",
                                                                       r / "img_emb" / "img_emb_03.npy")), [],
     "holds img_emb_03.npy and img_emb_3.npy, both part 3"),
    ("ambiguous-metadata", bad("clip-retrieval", lambda r, f: shutil.copy(r / "metadata" / "metadata_3.parquet",
                                                                          r / "metadata" / "metadata_003.parquet")),
     [], "holds metadata_003.parquet and metadata_3.parquet, both part 3"),
    ("seed-too-large", bad("npy+txt", lambda r, f: None), ["--seed", 2147483648], "is outside [0, 2147483647]"),
    ("txt-key-nul", bad("npy+txt", lambda r, f: (r / "keys.txt").write_bytes(b"a\n" * 10 + b"ab\0c\n" +
                                                                             b"b\n" * 289)), [],
     "line 11: key holds a NUL character"),
    ("txt-key-ends-in-nul", bad("npy+txt", lambda r, f: (r / "keys.txt").write_bytes(b"ab\0\n" * 300)), [],
     "line 1: key holds a NUL character"),
    ("txt-key-tab", bad("npy+txt", lambda r, f: (r / "keys.txt").write_bytes(b"".join(b"k%d\n" % i for i in range(10))
                                                                             + b"a\tb\n" + b"z\n" * 289)), [],
     "row 10: key 'a\\tb' holds a tab"),
    ("txt-key-carriage-return", bad("npy+txt", lambda r, f: (r / "keys.txt").write_bytes(b"a\rb\r\n" * 300)), [],
     "row 0: key 'a\\rb' holds a carriage return"),
    # A key two rows hold (deduplicate.py would refuse their cluster, the loaders' filter cannot tell them apart):
    # named by file and row, far apart in one file, and across the parts of clip-retrieval's layout.
    ("txt-key-repeated", bad("npy+txt", lambda r, f: (r / "keys.txt").write_text(
        "".join(key_of(i) + "\n" for i in range(299)) + key_of(2) + "\n")), [],
     f"keys.txt: row 299: key '{key_of(2)}' is also the key of row 2 (each key must name one sample"),
    ("parquet-key-repeated-across-parts", bad("clip-retrieval", lambda r, f: write_parquet(
        r / "metadata" / "metadata_11.parquet", image_path=[key_of(i) for i in range(275, 299)] + [key_of(30)])), [],
     f"metadata_11.parquet: row 24: key '{key_of(30)}' is also the key of row 5 of "),
    ("npy-key-nul", bad("npy+npy", lambda r, f: np.save(r / "keys.npy", np.array(["ok"] * 5 + ["ab\0cd"] * 295))),
     [], "row 5: key 'ab\\x00cd' holds a NUL"),
    ("npy-bytes-not-utf8", bad("npy+npy", lambda r, f: np.save(r / "keys.npy", np.array([b"ok"] * 7 + [b"a\xffb"] +
                                                                                        [b"ok"] * 292))), [],
     "row 7: key b'a\\xffb' is not UTF-8"),
    ("parquet-list-keys", bad("npy+parquet", lambda r, f: write_parquet(r / "keys.parquet",
                                                                        sample=[["a", "b"]] * 300)), [],
     "column 'sample' has type list<"),
    ("parquet-binary-not-utf8", bad("npy+parquet", lambda r, f: write_parquet(r / "keys.parquet",
                                                                              sample=[b"\xff"] * 300)), [],
     "row 0: key b'\\xff' is not UTF-8"),
    ("parquet-binary-ends-in-nul", bad("npy+parquet", lambda r, f: write_parquet(r / "keys.parquet",
                                                                                 sample=[b"a\0"] * 300)), [],
     "row 0: key b'a\\x00' ends in a NUL character"),
    ("parquet-no-key-column", bad("npy+parquet", lambda r, f: None), ["--key-column", None],
     "--key-column: is required with parquet keys"),
    ("keys-folder", bad("npy+txt", lambda r, f: (r / "keysdir").mkdir()), ["--keys", "keysdir"], "keysdir is a folder"),
    ("niter-zero", bad("npy+txt", lambda r, f: None), ["--niter", 0], "--niter: 0 is less than 1"),
    # not files: an empty .npy (numpy's EOFError was an internal error), a pipe and a device (they "did not exist")
    ("embeddings-empty", bad("npy+txt", lambda r, f: (r / "emb.npy").write_bytes(b"")), [],
     "emb.npy: is empty, not a .npy file (point at a file written by np.save)"),
    ("keys-a-pipe", bad("npy+txt", lambda r, f: os.mkfifo(r / "keys.fifo")), ["--keys", "keys.fifo"],
     "keys.fifo is not a regular file but a pipe or a device"),
    ("subset-a-device", bad("npy+txt", lambda r, f: None), ["--subset", "/dev/null"],
     "--subset: /dev/null is not a regular file but a pipe or a device"),
    ("embeddings-a-device", bad("npy+txt", lambda r, f: None), ["--embeddings", "/dev/null"],
     "--embeddings: /dev/null is not a regular file but a pipe or a device"),
    ("niter-past-c-int", bad("npy+txt", lambda r, f: None), ["--niter", 2**31],
     "--niter: 2147483648 is more than 2147483647, the most faiss's k-means takes"),
    ("workers-past-c-int-on-ray", bad("npy+txt", lambda r, f: None), ["--workers", 2**31, "--distributor", "ray"],
     "--workers: 2147483648 is more than 2147483647"),
    ("sample-below-k", bad("npy+txt", lambda r, f: None), ["--sample-size", 5],
     "--sample-size: 5 is not between k = 10 and the 300 rows"),
    ("parquet-null-key", bad("npy+parquet", lambda r, f: write_parquet(r / "keys.parquet", sample=NULL_AT_205)), [],
     "row 205: key is missing (null)"),
    ("subset-missing", bad("npy+txt", lambda r, f: None), ["--subset", "gone/kept_keys.npy"],
     "gone/kept_keys.npy does not exist"),
    ("subset-folder", bad("npy+txt", lambda r, f: (r / "kept").mkdir()), ["--subset", "kept"], "kept is a folder"),
    ("subset-2d", bad("npy+txt", lambda r, f: np.save(r / "kept.npy", np.array([[b"a", b"b"]]))),
     ["--subset", "kept.npy"], "has shape (1, 2) and dtype |S1; expected 1-D keys"),
]


LAYOUT_BAD = [  # (id, setup, extra flags, what the error says): layouts that cannot be read
    ("embeddings-not-npy", lambda root: [(root / "emb.csv").write_text("1,2\n") and "--embeddings", root / "emb.csv"],
     [], "emb.csv is not a .npy file"),
    ("npy-without-keys", bad("npy+txt", lambda r, f: None), ["--keys", None],
     "--keys: is required with a single .npy of embeddings"),
    ("embeddings-1d", bad("npy+txt", lambda r, f: np.save(r / "emb.npy", np.ones(300, np.float32))), [],
     "has shape (300,); embeddings are (rows, dim)"),
    ("embeddings-int", bad("npy+txt", lambda r, f: np.save(r / "emb.npy", np.ones((300, DIM), np.int32))), [],
     "has dtype int32; embeddings are float16 or float32"),
    ("embeddings-fortran", bad("npy+txt", lambda r, f: np.save(r / "emb.npy", np.ones((300, DIM), np.float32, "F"))),
     [], "is stored column by column (Fortran order)"),
    ("embeddings-npz-named-npy", bad("npy+txt", lambda r, f: write_npz_as(r / "emb.npy")), [],
     "emb.npy: is not a .npy file (it is a zip of arrays, an .npz)"),
    ("folder-of-nothing", lambda root: (root / "nothing").mkdir() or ["--embeddings", root / "nothing"], [],
     "holds no img_emb_<n>.npy and no .npz files"),
    ("clip-and-datacomp", bad("clip-retrieval", lambda r, f: np.savez(r / "img_emb" / "00000000.npz", l14_img=np.ones(
        (2, DIM)))), [], "holds both clip-retrieval parts and .npz shards"),
    ("clip-no-metadata", bad("clip-retrieval", lambda r, f: shutil.rmtree(r / "metadata")), [],
     "metadata is not a folder"),
    ("datacomp-no-parquet", bad("datacomp", lambda r, f: os.remove(r / "shards" / "00000000.parquet")), [],
     "00000000.npz: has no 00000000.parquet beside it"),
    ("datacomp-with-keys", bad("datacomp", lambda r, f: (r / "keys.txt").write_text("a\n")), ["--keys", "keys.txt"],
     "--keys: is not used with DataComp shards: their keys (uid) are in each <shard>.parquet (drop --keys)"),
    ("datacomp-damaged-npz", bad("datacomp", lambda r, f: (r / "shards" / "00000000.npz").write_bytes(b"PK broken")),
     [], "00000000.npz: is not a readable .npz file"),
    ("keys-missing", bad("npy+txt", lambda r, f: None), ["--keys", "nope.txt"], "nope.txt does not exist"),
    ("keys-csv", bad("npy+txt", lambda r, f: (r / "keys.csv").write_text("a\n" * 300)), ["--keys", "keys.csv"],
     "keys.csv is not a .txt, .npy or .parquet file"),
    ("keys-2d", bad("npy+npy", lambda r, f: np.save(r / "keys.npy", np.array([["a", "b"]] * 150))), [],
     "has shape (150, 2) and dtype <U1; keys are a 1-D string array"),
    ("parquet-unreadable", bad("npy+parquet", lambda r, f: (r / "keys.parquet").write_bytes(b"not parquet")), [],
     "keys.parquet: is not a readable parquet file"),
]


@pytest.mark.parametrize("setup,extra,expect", [pytest.param(s, e, x, id=i) for i, s, e, x in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, setup, extra, expect):
    flags = setup(tmp_path)
    args = [*flags, "--num_clusters", 10, "--save_folder", tmp_path / "save"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            at = args.index(flag)
            del args[at:at + 2]
        if value is not None:
            args += [flag, tmp_path / value if flag in ("--keys", "--subset") else value]
    r = run_script(CLUSTER_SCRIPT, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in error_line(r.stderr), r.stderr
    assert not (tmp_path / "save").exists()


def test_a_subset_array_of_no_keys_is_refused_before_the_keys_are_gathered(tmp_path):
    """--subset given another step's array (d_intra): refused from its header at the start, where the run would
    otherwise stop (DBP_PAUSE_AT) once it had gathered every key (minutes at LAION's size)."""
    flags, _ = layout(tmp_path, "npy+txt", embeddings(300))
    np.save(tmp_path / "dintra.npy", np.zeros(10))
    proc = start_script(CLUSTER_SCRIPT, *flags, "--num_clusters", 10, "--subset", tmp_path / "dintra.npy",
                        "--save_folder", tmp_path / "save", pause="keys gathered")
    _, err = finished(proc)
    assert proc.returncode == 2 and "dintra.npy has shape (10,) and dtype float64; expected 1-D keys" in err, err
    assert not (tmp_path / "save").exists()


def test_keys_lose_a_byte_order_mark_and_huge_rows_warn_nothing(tmp_path):
    """A keys .txt saved by an editor with a UTF-8 BOM: the first key is the key, not BOM + key; rows near
    float32's largest value are normalised without numpy's overflow warnings."""
    x = embeddings(300)
    x[5] *= 1e37
    flags, keys = layout(tmp_path, "npy+txt", x)
    (tmp_path / "keys.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "keys.txt").read_bytes())
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", 4, "--save_folder", tmp_path / "save")
    assert r.returncode == 0 and "arning" not in r.stderr, r.stderr  # (a progress bar may be drawn)
    first = [row for j in range(4) for row in np.load(tmp_path / "save" / "sorted_clusters" / f"cluster_{j}.npy")
             if row[1] == "0"]
    assert first[0][0] == keys[0]


@pytest.mark.parametrize("stage", ["k-means trained", "assign started", "write started"])
def test_ctrl_c_keeps_the_work_for_a_rerun_and_a_second_run_is_refused(tmp_path, stage):
    x = make_toy_clusters.make_embeddings(8000, DIM, concepts=40, seed=2)
    flags, _ = layout(tmp_path, "npy+txt", x)
    args = [*map(str, flags), "--num_clusters", "60", "--niter", "5", "--save_folder", str(tmp_path / "save")]
    proc = start_script(CLUSTER_SCRIPT, *args, "--workers", 2, pause=stage)
    wait_paused(proc, stage)
    second = run_script(CLUSTER_SCRIPT, *args)
    assert second.returncode == 2 and "in use by another run" in second.stderr and f"pid {proc.pid}" in second.stderr
    os.killpg(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)"), err
    assert "Traceback" not in err and "Exception" not in err
    staged = tmp_path / "save" / ".dbp_staging"
    assert (staged / "kmeans_centroids.npy").exists() and not (tmp_path / "save" / "sorted_clusters").exists()
    r = run_script(CLUSTER_SCRIPT, *args)
    assert r.returncode == 0, r.stderr
    assert "resumed a stopped run; done before: the keys, k-means" in r.stdout
    assert len(os.listdir(tmp_path / "save" / "sorted_clusters")) == 60 and not staged.exists()


def test_subset_reads_prunes_trie_as_its_kept_keys_and_a_subset_matching_nothing_says_so(tmp_path):
    import pygtrie

    import dbp_utils as du

    x = embeddings(600)
    flags, keys = layout(tmp_path, "npy+txt", x)
    chosen = sorted(keys[::3])
    stripped = sorted(k.rsplit(".", 1)[0] for k in chosen)
    np.save(tmp_path / "kept_keys.npy", np.array([k.encode() for k in stripped]))
    with open(tmp_path / "kept_keys_trie.pkl", "wb") as f:
        du.write_trie(f, np.array([k.encode() for k in stripped]))
    trie = du.load_trie(str(tmp_path / "kept_keys_trie.pkl"))
    assert isinstance(trie, pygtrie.StringTrie) and sorted(trie.keys()) == stripped  # (what prune writes)
    runs = {}
    for name in ("kept_keys.npy", "kept_keys_trie.pkl"):
        r = run_script(CLUSTER_SCRIPT, *flags, "--subset", tmp_path / name, "--num_clusters", 4,
                       "--save_folder", tmp_path / name.replace(".", "_"))
        assert r.returncode == 0 and f"clustered {len(chosen)} rows of --subset" in r.stdout, r.stderr
        _, clusters = read_output(tmp_path / name.replace(".", "_"))
        runs[name] = clusters
        assert sorted(k for c in clusters if c.size for k in c[:, 0]) == chosen
    for a, b in zip(runs["kept_keys.npy"], runs["kept_keys_trie.pkl"]):
        assert np.array_equal(a, b)
    (tmp_path / "other.txt").write_text("elsewhere/1.jpg\nelsewhere/2.jpg\n")
    r = run_script(CLUSTER_SCRIPT, *flags, "--subset", tmp_path / "other.txt", "--num_clusters", 4,
                   "--save_folder", tmp_path / "none")
    assert r.returncode == 2
    assert f"--subset: none of the 2 keys in {tmp_path / 'other.txt'} is a key of the embeddings" in \
        error_line(r.stderr)
    assert not (tmp_path / "none").exists()
    # some keys found, two not: the run goes on with those found, and says (and logs) how many were not
    (tmp_path / "some.txt").write_text("".join(k + "\n" for k in chosen) + "elsewhere/1.jpg\nelsewhere/2.jpg\n")
    r = run_script(CLUSTER_SCRIPT, *flags, "--subset", tmp_path / "some.txt", "--num_clusters", 4,
                   "--save_folder", tmp_path / "some")
    assert r.returncode == 0 and f"clustered {len(chosen)} rows of --subset" in r.stdout, r.stderr
    said = f"2 keys of --subset {tmp_path / 'some.txt'} are not among the embeddings' keys"
    assert f"warning: {said}" in r.stderr and f"WARNING {said}" in (tmp_path / "some" / "logs.log").read_text()


def test_k_sweep_gives_faiss_own_objective_at_each_k_and_the_run_goes_on_at_its_k(tmp_path):
    import csv

    import faiss

    x = embeddings(2000)
    flags, _ = layout(tmp_path, "npy+txt", x)
    ks = [3, 6, 12]
    r = run_script(CLUSTER_SCRIPT, *flags, "--k-sweep", *ks, "--save_folder", tmp_path / "sweep", "--niter", 8)
    assert r.returncode == 0 and "k sweep of 2000 rows at k = 3, 6, 12" in r.stdout, r.stderr
    assert sorted(os.listdir(tmp_path / "sweep")) == ["k_sweep.csv", "k_sweep.png", "logs.log"]  # only the sweep
    with open(tmp_path / "sweep" / "k_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["k", "objective", "size_min", "size_median", "size_max", "dintra_spread",
                             "complexity_spread"]
    # By the definition: the sample a run at k = 12 trains on (256 per centroid, seeded), normalised, and faiss's
    # own k-means of it at each k with the run's seed and iterations.
    sample = min(2000, 256 * max(ks))
    chosen = np.sort(np.random.default_rng(1234).choice(2000, size=sample, replace=False))
    unit = x[chosen].astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    for row, k in zip(rows, ks):
        direct = faiss.Kmeans(DIM, k, niter=8, seed=1234, spherical=True, max_points_per_centroid=-(-sample // k),
                              min_points_per_centroid=1)
        direct.train(unit)
        assert int(row["k"]) == k and float(row["objective"]) == pytest.approx(direct.obj[-1], rel=1e-5)
        c = direct.centroids / np.linalg.norm(direct.centroids, axis=1, keepdims=True)
        sims = unit @ c.T
        sizes = np.bincount(sims.argmax(axis=1), minlength=k)
        assert (int(row["size_min"]), float(row["size_median"]), int(row["size_max"])) == \
            (sizes.min(), np.median(sizes), sizes.max())
        d_intra = np.array([np.mean(1 - sims[sims.argmax(axis=1) == j, j]) for j in range(k)])
        assert float(row["dintra_spread"]) == pytest.approx(np.ptp(d_intra), rel=1e-3)
    r = run_script(CLUSTER_SCRIPT, *flags, "--k-sweep", *ks, "--num_clusters", 12, "--save_folder", tmp_path / "run",
                   "--niter", 8)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run" / "clustering.json").read_text())
    assert record["kmeans_objective"] == float(rows[-1]["objective"])  # at the largest k: the run's own
    assert record["rows_per_cluster"] == 2000 / 12 and (tmp_path / "run" / "clusters.png").exists()
    _, clusters = read_output(tmp_path / "run")
    sizes = np.array([len(c) if c.size else 0 for c in clusters])
    assert record["median_cluster"] == float(np.median(sizes))
    # The sweep's fit at k = 12 is the run's k-means: not trained twice, the same bytes as a run without a sweep.
    assert "k-means at k = 12 from the sweep, not trained again" in r.stdout
    r = run_script(CLUSTER_SCRIPT, *flags, "--num_clusters", 12, "--save_folder", tmp_path / "plain", "--niter", 8)
    assert r.returncode == 0, r.stderr
    for name in ["kmeans_centroids.npy", *(f"sorted_clusters/cluster_{j}.npy" for j in range(12))]:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_clusters_figure_marks_the_smallest_median_and_largest_cluster():
    from dbpkit.cluster_report import PAPER_SETTINGS, clusters_figure

    sizes = np.array([0, 1, 40, 40, 900])
    ax = clusters_figure(sizes, None).axes[0]
    marks = {line.get_label().split(":")[0]: line.get_xdata()[0] for line in ax.lines}
    assert marks["smallest"] == 1 and marks["median"] == 40 and marks["largest"] == 900
    assert sorted(v for name, v in marks.items() if name in PAPER_SETTINGS) == sorted(PAPER_SETTINGS.values())
    assert "1 empty, 1 of one row" in ax.get_title() and ax.get_xscale() == "log"


def test_cluster_figures_at_laions_scale_keep_their_legends_off_the_data_and_their_titles_whole():
    """k = 500 over 330M rows (~560k a cluster, the paper's DBP setting): the histogram's bars stand at the right,
    under clusters.png's legend as it was; k_sweep.png's spreads grow with k, to the right too. Read back from
    the drawn figures: no bar top or point under a legend, the two-line title inside the picture."""
    from conftest import bar_tops, drawn, under_legend

    from dbpkit.cluster_report import clusters_figure, k_sweep_figure

    sizes = np.round(np.random.default_rng(0).lognormal(np.log(560_000), 0.6, 500)).astype(np.int64)
    figure = clusters_figure(sizes, 1234.5)
    ax = figure.axes[0]
    heights, edges = np.histogram(sizes, bins=[p.get_x() for p in ax.patches] + [ax.patches[-1].get_x()
                                                                                 + ax.patches[-1].get_width()])
    assert heights.sum() == 500 and under_legend(ax, bar_tops(edges, heights)) == []
    title = ax.title.get_window_extent(drawn(figure))
    assert title.x0 >= 0 and title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height
    assert f"{sizes.sum():,} rows" in ax.get_title()
    k = np.array([100, 200, 500, 1000, 2000])
    right = k_sweep_figure({"k": k, "objective": k * 1.0, "dintra_spread": 0.01 * np.log(k),
                            "complexity_spread": 0.004 * np.log(k)}).axes[1]
    points = np.vstack([line.get_xydata() for line in right.lines])
    assert len(points) == 10 and under_legend(right, points) == []


@pytest.mark.parametrize("form", ["kept_keys.npy", "kept_keys_trie.pkl", "paths.txt"])
def test_subset_keys_are_stripped_once(tmp_path, form):
    """kept_keys.npy and the trie hold keys, stripped already: `s/a.tar` (from s/a.tar.gz) selects that sample, not
    s/a.png, whose key is `s/a` (stripping it again would swap them); a text file holds paths, stripped once."""
    import dbp_utils as du
    from dbpkit import layouts

    paths = ["s/a.tar.gz", "s/a.png", "s/b.jpg", "t/c.d.e.jpg", "t/c.webp"]
    np.save(tmp_path / layouts.KEYS_FILE, np.array([p.encode() for p in paths]))
    chosen = [b"s/a.tar", b"t/c.d.e"]  # the keys of rows 0 and 3
    if form == "kept_keys.npy":
        np.save(tmp_path / form, np.array(chosen))
    elif form == "kept_keys_trie.pkl":
        with open(tmp_path / form, "wb") as f:
            du.write_trie(f, np.array(chosen))
    else:
        (tmp_path / form).write_text("s/a.tar.gz\nt/c.d.e.jpg\n")
    assert layouts.subset_rows(str(tmp_path), str(tmp_path / form)) == (2, 0)
    assert np.load(tmp_path / layouts.SUBSET_ROWS).tolist() == [0, 3]


@pytest.mark.parametrize("setup,extra,expect", [pytest.param(s, e, x, id=i) for i, s, e, x in LAYOUT_BAD])
def test_a_layout_that_cannot_be_read_is_named_with_its_fix(tmp_path, setup, extra, expect):
    """Asked of the layout reader directly: cluster_embeddings.py turns its UsageError into the one line the
    cases above read, before it writes anything."""
    from dbpkit import layouts
    from dbpkit.errors import UsageError

    flags = dict(zip(*[iter(setup(tmp_path))] * 2))
    for flag, value in zip(extra[::2], extra[1::2]):
        flags[flag] = None if value is None else tmp_path / value
    with pytest.raises(UsageError) as refused:
        layouts.find_embeddings(str(flags["--embeddings"]), flags.get("--keys") and str(flags["--keys"]),
                                flags.get("--key-column"), "l14_img")
    assert expect in str(refused.value)
