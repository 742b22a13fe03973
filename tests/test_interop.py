"""NeMo Curator's k-means results in, DataComp's subset file out."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import (
    CLUSTER_SCRIPT,
    DINTER_SCRIPT,
    DINTRA_SCRIPT,
    PRUNE_SCRIPT,
    error_line,
    finished,
    make_toy_clusters,
    run_script,
    start_script,
)

import dbp_utils as du
from dbpkit.clusters import cluster_table

N, DIM, K = 1200, 12, 8
MISSING, EMPTY = 3, 5  # cluster 3 has no centroid=3 folder at all, cluster 5 a folder with no rows


def nemo_results(root, ids_kind, float16, with_centroids):
    """NeMo Curator 1.x's kmeans_results, written with pandas' Hive partitioning: unsorted rows, the id, the
    embeddings as a list column, both distances and a metadata column; cluster 2 split over two files."""
    rng = np.random.default_rng(0)
    x = make_toy_clusters.make_embeddings(N, DIM, concepts=6, seed=1).astype(np.float32)
    x *= rng.uniform(0.5, 2, (N, 1)).astype(np.float32)  # NeMo's embeddings need not be unit length
    centroids = rng.standard_normal((K, DIM)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.argmax(unit @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T, axis=1)
    labels[labels == MISSING] = 0  # no member: no folder
    labels[labels == EMPTY] = 1
    ids = np.arange(N) * 7 + 100000 if ids_kind == "int" else [f"doc-{i:05d}" for i in range(N)]
    cos = 1 - (unit * (centroids / np.linalg.norm(centroids, axis=1, keepdims=True))[labels]).sum(axis=1)
    emb = x.astype(np.float16).view(np.uint16) if float16 else x
    order = rng.permutation(N)  # NeMo's rows are not sorted
    frame = pd.DataFrame({"id": np.asarray(ids)[order], "embeddings": list(emb[order]), "caption": "a photo",
                          "cosine_dist_to_cent": cos[order].astype(np.float32),
                          "l2_dist_to_cent": np.linalg.norm(x - centroids[labels], axis=1)[order].astype(np.float32),
                          "centroid": labels[order]})
    results = root / "cache" / "kmeans_results"
    frame[frame.centroid != 2].to_parquet(results, partition_cols=["centroid"])
    two = frame[frame.centroid == 2].drop(columns="centroid")
    (results / "centroid=2").mkdir()
    two.iloc[: len(two) // 2].to_parquet(results / "centroid=2" / "task_0.parquet")
    two.iloc[len(two) // 2:].to_parquet(results / "centroid=2" / "task_1.parquet")
    (results / f"centroid={EMPTY}").mkdir()
    frame.drop(columns="centroid").iloc[:0].to_parquet(results / f"centroid={EMPTY}" / "task_0.parquet")
    if with_centroids:
        np.save(root / "cache" / "kmeans_centroids.npy", centroids)
    stored = emb.view(np.float16).astype(np.float32) if float16 else x
    return results, {"x": stored, "ids": [str(i) for i in ids], "labels": labels, "cos": cos, "centroids": centroids,
                     "files": {j: sorted((results / f"centroid={j}").glob("*.parquet")) for j in range(K)
                               if (results / f"centroid={j}").exists()}}


@pytest.mark.parametrize("ids_kind,float16,with_centroids", [  # each value of each, each pair of two of them
    ("int", True, True), ("str", False, True), ("int", False, False), ("str", True, False)])
def test_nemo_curator_results_become_semdedups_layout(tmp_path, ids_kind, float16, with_centroids):
    results, truth = nemo_results(tmp_path, ids_kind, float16, with_centroids)
    save = tmp_path / "save"
    r = run_script(CLUSTER_SCRIPT, "--from-nemo-curator", results, "--save_folder", save, "--num_clusters", K)
    assert r.returncode == 0, r.stderr
    beside = tmp_path / "cache" / "kmeans_centroids.npy"
    assert (f"centroids: {beside}" if with_centroids else "centroids: the normalised mean") in r.stdout
    seen, first = [], 0
    for j in range(K):
        rows = np.load(save / "sorted_clusters" / f"cluster_{j}.npy")
        members = np.flatnonzero(truth["labels"] == j)
        if j in (MISSING, EMPTY):
            assert rows.shape == (0,) and rows.dtype == np.float64
            continue
        assert rows.shape == (len(members), 4) and (rows[:, 3] == str(j)).all()
        assert sorted(rows[:, 0].tolist()) == sorted(truth["ids"][i] for i in members)
        d = rows[:, 2].astype(np.float64)
        assert (np.diff(d) <= 0).all()  # sorted as SemDeDup does: farthest first
        by_id = dict(zip(truth["ids"], truth["cos"]))
        np.testing.assert_allclose(d, [by_id[key] for key in rows[:, 0]], atol=1e-6)
        # The same file as our own writer gives for this cluster, its rows numbered on from the last cluster's.
        files = pd.concat([pd.read_parquet(f) for f in truth["files"][j]])
        expected = cluster_table(np.array(files["id"].astype(str).tolist()), np.arange(first, first + len(files)),
                                 files["cosine_dist_to_cent"].to_numpy(np.float32), j, True)
        np.testing.assert_array_equal(rows, expected)
        first += len(files)
        seen += rows[:, 0].tolist()
    assert sorted(seen) == sorted(truth["ids"])
    centroids = np.load(save / "kmeans_centroids.npy")
    assert centroids.dtype == np.float32 and centroids.shape == (K, DIM)
    if with_centroids:
        np.testing.assert_array_equal(centroids, truth["centroids"])
    else:  # the normalised mean of each cluster's normalised embeddings; NaN where no member defines it
        x = truth["x"].astype(np.float64)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        for j in range(K):
            if j in (MISSING, EMPTY):
                assert np.isnan(centroids[j]).all()
            else:
                mean = unit[truth["labels"] == j].mean(axis=0)
                np.testing.assert_allclose(centroids[j], mean / np.linalg.norm(mean), atol=1e-5)

    # And the three DBP scripts run on it: empty clusters get NaN d_intra (and NaN d_inter without centroids).
    sorted_dir = save / "sorted_clusters"
    assert run_script(DINTRA_SCRIPT, "--sorted_clusters_path", sorted_dir, "--avg_distance_to_cent_save_path",
                      tmp_path / "dintra.npy").returncode == 0
    r = run_script(DINTER_SCRIPT, "--sorted_clusters_path", sorted_dir, "--mean_centroid_distances_save_path",
                   tmp_path / "dinter.npy", "--num_NNs", 3)
    assert r.returncode == 0, r.stderr
    d_inter = np.load(tmp_path / "dinter.npy")
    assert np.isnan(d_inter[[MISSING, EMPTY]]).all() != with_centroids and np.isfinite(d_inter[[0, 1, 2]]).all()
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", sorted_dir, "--avg_distance_to_cent_save_path",
                   tmp_path / "dintra.npy", "--mean_centroid_distances_save_path", tmp_path / "dinter.npy",
                   "--prune-ratio", 0.5, "--save-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "run" / "kept_paths.txt").read_text().split()) == N // 2


def write_table(path, **columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(columns).to_parquet(path)


def rewrite(folder, **columns):
    """Replace the one parquet file of a centroid=<j> folder by one with the given columns."""
    for old in folder.glob("*.parquet"):
        old.unlink()
    write_table(folder / "task_0.parquet", **columns)


NEMO_BAD = [  # (id, change to a valid result folder, extra flags, what the one line says)
    ("missing-id-column", lambda r: None, ["--id-column", "image_id"], "has no column 'image_id'"),
    ("k-below-folders", lambda r: None, ["--num_clusters", 4], "names cluster 7, but --num_clusters is 4"),
    ("nowhere", lambda r: None, ["--from-nemo-curator", "nowhere"], "does not exist"),
    ("same-cluster-twice", lambda r: shutil.copytree(r / "centroid=2", r / "centroid=02"), [], "both name cluster 2"),
    ("text-partition", lambda r: os.rename(r / "centroid=4", r / "centroid=x"), [], "'x', which is not a number"),
    ("float-partition", lambda r: os.rename(r / "centroid=4", r / "centroid=1.0"), [], "which is not a number"),
    ("huge-partition", lambda r: os.rename(r / "centroid=4", r / "centroid=100000000000000000000"), [],
     "makes k = 100000000000000000001 clusters of only"),
    ("beyond-rows", lambda r: os.rename(r / "centroid=4", r / "centroid=99999"), [], "makes k = 100000 clusters"),
    ("text-distances", lambda r: rewrite(r / "centroid=4", id=["a", "b"], embeddings=[[1.0, 0.0], [0.0, 1.0]],
                                         cosine_dist_to_cent=["0.1", "0.2"]), [], "not floating-point distances"),
    ("list-ids", lambda r: rewrite(r / "centroid=4", id=[["a"], ["b"]], embeddings=[[1.0, 0.0], [0.0, 1.0]],
                                   cosine_dist_to_cent=[0.1, 0.2]), [], "not text or integer ids"),
    ("binary-ids-not-utf8", lambda r: rewrite(r / "centroid=4", id=[b"\xff\xfe", b"ok"], cosine_dist_to_cent=[0.1, 0.2],
                                              embeddings=[[1.0] * DIM, [2.0] * DIM]), [], "is not UTF-8"),
    ("other-dimension", lambda r: rewrite(r / "centroid=4", id=["a", "b"], embeddings=[[1.0, 0.0], [0.0, 1.0]],
                                          cosine_dist_to_cent=[0.1, 0.2]), [], f"dimensions [2, {DIM}]"),
    ("zero-d-centroids", lambda r: np.save(r.parent / "kmeans_centroids.npy", np.float32(1)), [],
     "has shape (); centroids are a 2-D"),
    ("centroid-count", lambda r: np.save(r.parent / "kmeans_centroids.npy", np.ones((5, DIM), np.float32)), [],
     "names cluster 7, but"),
    ("keys-flag", lambda r: None, ["--keys", "keys.txt"], "--keys: is not used with --from-nemo-curator"),
    ("no-partitions", lambda r: [shutil.rmtree(folder) for folder in list(r.iterdir())], [],
     "holds no centroid=<j> folders of parquet files"),
    ("stray-parquet", lambda r: shutil.copy(r / "centroid=2" / "task_0.parquet", r / "stray.parquet"), [],
     "stray.parquet: is not in a centroid=<j> folder"),
    ("embeddings-not-lists", lambda r: rewrite(r / "centroid=4", id=["a", "b"], embeddings=[1.0, 2.0],
                                               cosine_dist_to_cent=[0.1, 0.2]), [],
     "column 'embeddings' has type double, not lists of floats"),
    ("ragged-embeddings", lambda r: rewrite(r / "centroid=4", id=["a", "b"], embeddings=[[1.0] * DIM, [1.0] * 3],
                                            cosine_dist_to_cent=[0.1, 0.2]), [],
     "embeddings of different lengths (3 to"),
    ("text-embeddings", lambda r: rewrite(r / "centroid=4", id=["a", "b"], embeddings=[["x"] * DIM, ["y"] * DIM],
                                          cosine_dist_to_cent=[0.1, 0.2]), [],
     "column 'embeddings' has type list<element: string>, not lists of floats"),
    ("nan-distance", lambda r: rewrite(r / "centroid=4", id=["a", "b"], embeddings=[[1.0] * DIM, [2.0] * DIM],
                                       cosine_dist_to_cent=[0.1, float("nan")]), [],
     "row 1: cosine_dist_to_cent is nan"),
    ("unreadable-partitions", lambda r: (r / "a_first.parquet").write_bytes(b"not parquet"), [],
     "cannot be read as parquet partitions"),
    ("damaged-parquet", lambda r: (r / "centroid=2" / "task_1.parquet").write_bytes(b"PAR1 damaged"), [],
     "task_1.parquet: is not a readable parquet file"),
    ("dimension-within-a-cluster", lambda r: write_table(r / "centroid=2" / "task_1.parquet", id=["a", "b"],
                                                         embeddings=[[1.0, 0.0], [0.0, 1.0]],
                                                         cosine_dist_to_cent=[0.1, 0.2]), [],
     "task_1.parquet: holds embeddings of dimension 2,"),
]


@pytest.mark.parametrize("change,extra,expect", [pytest.param(c, e, x, id=i) for i, c, e, x in NEMO_BAD])
def test_nemo_curator_bad_input_is_one_line_and_writes_nothing(tmp_path, change, extra, expect):
    results, _ = nemo_results(tmp_path, "str", False, False)
    change(results)
    args = ["--from-nemo-curator", results, "--save_folder", tmp_path / "save"]
    for flag, value in zip(extra[::2], extra[1::2]):
        args += [flag, tmp_path / value if flag == "--from-nemo-curator" else value]
    r = run_script(CLUSTER_SCRIPT, *args)
    assert r.returncode == 2 and expect in error_line(r.stderr), r.stderr
    assert not (tmp_path / "save").exists()


def repeat_id(results, source, row, target, at):
    """Give row `at` of the parquet file `target` (-1: its last) the id of row `row` of `source`; return both files and
    rows, as pandas reads them, and the id."""
    (source,), (target,) = [sorted((results / folder).glob(name)) for folder, name in (source, target)]
    frame = pd.read_parquet(target)
    at = at % len(frame)
    key = pd.read_parquet(source)["id"].iloc[row]
    frame.loc[frame.index[at], "id"] = key
    frame.to_parquet(target)
    return source, row, target, at, str(key)


@pytest.mark.parametrize("ids_kind,source,row,target,at", [
    ("str", ("centroid=0", "*.parquet"), 3, ("centroid=4", "*.parquet"), -1),  # two clusters, far apart
    ("int", ("centroid=0", "*.parquet"), 0, ("centroid=0", "*.parquet"), -1),  # one file: its first row and last
    ("str", ("centroid=2", "task_0.parquet"), 5, ("centroid=2", "task_1.parquet"), 7),  # a cluster's two files
])
def test_nemo_curator_id_held_by_two_rows_is_refused(tmp_path, ids_kind, source, row, target, at):
    """deduplicate.py refuses a key twice in a cluster, and the kept keys (a set) would count one in two clusters
    once: the conversion refuses both, naming each row by its parquet file."""
    results, _ = nemo_results(tmp_path, ids_kind, False, True)
    first, row, second, at, key = repeat_id(results, source, row, target, at)
    r = run_script(CLUSTER_SCRIPT, "--from-nemo-curator", results, "--save_folder", tmp_path / "save")
    elsewhere = "" if first == second else f" of {first}"
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr).startswith(f"error: {second}: row {at}: id {key!r} is also the id of row {row}"
                                           f"{elsewhere} (each id must name one sample"), r.stderr
    assert not (tmp_path / "save").exists()


def test_dask_era_nearest_cent_folders_are_read(tmp_path):
    results, truth = nemo_results(tmp_path, "int", False, True)
    for folder in results.iterdir():
        os.rename(folder, results / folder.name.replace("centroid=", "nearest_cent="))
    r = run_script(CLUSTER_SCRIPT, "--from-nemo-curator", results, "--save_folder", tmp_path / "save")
    assert r.returncode == 0, r.stderr
    sizes = [len(np.load(tmp_path / "save" / "sorted_clusters" / f"cluster_{j}.npy")) for j in range(K)]
    assert sizes == np.bincount(truth["labels"], minlength=K).tolist()


def datacomp_lookup(subset, uid):
    """How DataComp's resharder finds a uid in the subset file: its two 64-bit halves, binary search."""
    key = np.array([divmod(int(uid, 16), 2**64)], subset.dtype)[0]
    return np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left")


def test_datacomp_subset_is_what_the_resharder_reads(tmp_path):
    uids = [f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}{(i * 7919) % (1 << 64):016x}" for i in range(600)]
    sorted_dir = tmp_path / "sorted"
    sorted_dir.mkdir()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, len(uids))
    for j in range(4):
        rows = [(uids[i], i, float(rng.random()), j) for i in np.flatnonzero(labels == j)]
        np.save(sorted_dir / f"cluster_{j}.npy", sorted(rows, key=lambda row: row[2], reverse=True))
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", sorted_dir, "--density", "uniform", "--prune-ratio", 0.4,
                   "--save-dir", tmp_path / "run", "--datacomp-subset")
    assert r.returncode == 0, r.stderr
    subset = np.load(tmp_path / "run" / "datacomp_subset.npy")
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == int(0.4 * len(uids))
    as_int = [(int(hi) << 64) | int(lo) for hi, lo in subset.tolist()]
    assert as_int == sorted(set(as_int))  # sorted, each uid once
    kept = set((tmp_path / "run" / "kept_paths.txt").read_text().split())
    assert all(datacomp_lookup(subset, uid) == (uid in kept) for uid in uids)
    assert json.loads((tmp_path / "run" / "params.json").read_text())["datacomp_subset"] is True

    np.save(sorted_dir / "cluster_4.npy", [("not-a-uid.jpg", 600, 0.9, 4), ("also-not", 601, 0.1, 4)])
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", sorted_dir, "--density", "uniform", "--prune-ratio", 0.4,
                   "--save-dir", tmp_path / "bad", "--datacomp-subset")
    assert r.returncode == 2 and "is not a DataComp uid (32 hex digits)" in r.stderr
    assert not os.path.exists(tmp_path / "bad")

    # Keys that are no uids at all (another data set's): refused before any cluster is selected.
    np.save(sorted_dir / "cluster_0.npy", [("00000/000000004.jpg", 700, 0.9, 0)])
    marker = tmp_path / "a selection task started"  # (where one would stop, for ever: the check comes first)
    proc = start_script(PRUNE_SCRIPT, "--sorted-clusters-path", sorted_dir, "--density", "uniform", "--prune-ratio",
                        0.4, "--save-dir", tmp_path / "bad", "--datacomp-subset", "--workers", 2,
                        pause=f"task select_cluster {marker}")
    _, stderr = finished(proc)
    assert proc.returncode == 2 and "the kept key '00000/000000004' is not a DataComp uid" in stderr
    assert not marker.exists() and not os.path.exists(tmp_path / "bad")


def test_datacomp_uids_of_any_case_are_their_numbers():
    """The fast path reads sorted lower-case uids as they are; other cases are sorted and counted once."""
    uids = sorted(f"{(i * 0x9E3779B97F4A7C15) % (1 << 128):032x}" for i in range(500))
    mixed = np.array(sorted([u.encode() for u in uids] + [uids[7].upper().encode(), uids[3][:20].encode()
                                                          + uids[3][20:].upper().encode()]))
    expected = sorted({divmod(int(u, 16), 2**64) for u in uids})
    for keys in (np.array([u.encode() for u in uids]), mixed):
        subset = du.datacomp_subset(keys)
        assert subset.dtype == np.dtype("u8,u8") and subset.tolist() == expected
