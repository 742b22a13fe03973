"""d_intra and d_inter against brute force on the same data, through the scripts."""

import os
import shutil

import numpy as np
import pytest
from conftest import DINTER_SCRIPT, DINTRA_SCRIPT, brute_dinter, brute_dintra, run_script


def test_dintra_matches_brute_force(dataset, tmp_path):
    out = tmp_path / "sub" / "dintra.npy"
    r = run_script(DINTRA_SCRIPT, "--num_clusters", dataset["k"], "--sorted_clusters_path", dataset["sorted"],
                   "--avg_distance_to_cent_save_path", out)
    assert r.returncode == 0, r.stderr
    d_intra = np.load(out)
    assert d_intra.dtype == np.float32 and d_intra.shape == (dataset["k"],)
    expected = brute_dintra(dataset)
    empty = dataset["edge_clusters"]["empty"]
    assert np.isnan(d_intra[empty]) and np.isnan(expected[empty])
    assert np.isnan(d_intra).sum() == 1
    np.testing.assert_allclose(d_intra, expected, atol=1e-5)
    one = dataset["edge_clusters"]["one member"]
    assert d_intra[one] == pytest.approx(1 - dataset["sims"][dataset["labels"] == one][0], abs=1e-6)
    assert f"d_intra of {dataset['k']} clusters" in r.stdout


def test_dintra_workers_agree_and_k_is_inferred(desc_str, tmp_path):
    outs = []
    for workers in ("1", "3"):
        outs.append(tmp_path / f"w{workers}.npy")
        r = run_script(DINTRA_SCRIPT, "--sorted-clusters-path", desc_str["sorted"],
                       "--avg-distance-to-cent-save-path", outs[-1], "--workers", workers)
        assert r.returncode == 0, r.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_dintra_keeps_long_and_unicode_keys_and_warns_on_unsorted(tmp_path):
    folder = tmp_path / "sorted"
    folder.mkdir()
    long_key = "shard_000012/" + "x" * 80 + "_é.jpg"
    np.save(folder / "cluster_0.npy", [(long_key, 0, 0.5, 0), ("a/b.jpg", 1, 0.25, 0)])
    np.save(folder / "cluster_1.npy", [("c/d.jpg", 2, 0.1, 1), ("c/e.jpg", 3, 0.3, 1), ("c/f.jpg", 4, 0.2, 1)])
    out = tmp_path / "dintra.npy"
    r = run_script(DINTRA_SCRIPT, "--sorted_clusters_path", folder, "--avg_distance_to_cent_save_path", out)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(out), [0.375, 0.2], rtol=1e-6)
    assert "not sorted" in r.stderr and "cluster_1.npy" in r.stderr


@pytest.mark.parametrize("num_nns", [1, 3, 20, 100])
def test_dinter_matches_brute_force(desc_str, tmp_path, num_nns):
    out = tmp_path / "dinter.npy"
    r = run_script(DINTER_SCRIPT, "--num_clusters", desc_str["k"], "--sorted_clusters_path", desc_str["sorted"],
                   "--mean_centroid_distances_save_path", out, "--num_NNs", num_nns)
    assert r.returncode == 0, r.stderr
    d_inter = np.load(out)
    assert d_inter.dtype == np.float32 and d_inter.shape == (desc_str["k"],)
    np.testing.assert_allclose(d_inter, brute_dinter(desc_str["centroids"], num_nns), atol=1e-5)
    assert ("warning" in r.stderr) == (num_nns >= desc_str["k"])


def test_dinter_excludes_self_among_duplicate_centroids(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 8)).astype(np.float32)
    # Three copies of centroid 0 and two of centroid 1: each copy's nearest "other" is at distance 0.
    centroids = np.concatenate([base, base[[0, 0, 1]]]) * rng.uniform(0.5, 2, (8, 1)).astype(np.float32)
    path = tmp_path / "centroids.npy"
    np.save(path, centroids)
    for num_nns in (1, 2, 4, 7):
        out = tmp_path / f"dinter{num_nns}.npy"
        r = run_script(DINTER_SCRIPT, "--centroids_file", path, "--mean_centroid_distances_save_path", out,
                       "--num_NNs", num_nns, "--dim", 8)
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(np.load(out), brute_dinter(centroids, num_nns), atol=1e-5)
    assert np.load(tmp_path / "dinter1.npy")[[0, 5, 6]] == pytest.approx(0, abs=1e-6)


def test_dinter_finds_centroids_in_sorted_folder_or_its_parent(desc_str, tmp_path):
    sorted_copy = tmp_path / "save" / "sorted"
    shutil.copytree(desc_str["sorted"], sorted_copy)
    expected = brute_dinter(desc_str["centroids"], 20)
    for where in (sorted_copy.parent, sorted_copy):
        np.save(where / "kmeans_centroids.npy", desc_str["centroids"])
        out = tmp_path / "dinter.npy"
        r = run_script(DINTER_SCRIPT, "--sorted-clusters-path", sorted_copy, "--mean-centroid-distances-save-path", out,
                       "--overwrite")
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
        os.remove(where / "kmeans_centroids.npy")


def test_dinter_of_extreme_but_finite_centroids(desc_str, tmp_path):
    """Rows scaled by 1e200 or 1e-200 have the same directions: the same d_inter, not overflow or 'all zeros'."""
    centroids = desc_str["centroids"].astype(np.float64)
    scaled = centroids * np.where(np.arange(len(centroids)) % 2, 1e200, 1e-200)[:, None]
    np.save(tmp_path / "centroids.npy", scaled)
    r = run_script(DINTER_SCRIPT, "--centroids_file", tmp_path / "centroids.npy",
                   "--mean_centroid_distances_save_path", tmp_path / "dinter.npy")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "dinter.npy"), brute_dinter(centroids, 20), atol=1e-5)


def test_dintra_of_huge_distances_is_their_mean(tmp_path):
    """Three distances of 1e38 sum past float32 but their mean fits: d_intra is that mean, not inf."""
    folder = tmp_path / "sorted"
    folder.mkdir()
    np.save(folder / "cluster_0.npy", [(f"a/{i}.jpg", i, 3e38, 0) for i in range(3)])
    np.save(folder / "cluster_1.npy", [("b/0.jpg", 3, 1.5e308, 1), ("b/1.jpg", 4, 1.5e308, 1), ("b/2.jpg", 5, 0, 1)])
    r = run_script(DINTRA_SCRIPT, "--sorted_clusters_path", folder, "--avg_distance_to_cent_save_path",
                   tmp_path / "dintra.npy")
    assert r.returncode == 2 and "cluster_1.npy: the mean distance 1e+308 is too large" in r.stderr
    os.remove(folder / "cluster_1.npy")
    r = run_script(DINTRA_SCRIPT, "--sorted_clusters_path", folder, "--avg_distance_to_cent_save_path",
                   tmp_path / "dintra.npy")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "dintra.npy")[0] == np.float32(3e38)


def test_npy_format_3_is_read(tmp_path):
    """np.save writes format 3.0 for some arrays; np.load reads it, so do the scripts."""
    folder = tmp_path / "sorted"
    folder.mkdir()
    rows = np.array([("a/é.jpg", "0", "0.5", "0"), ("a/b.jpg", "1", "0.25", "0")])
    with open(folder / "cluster_0.npy", "wb") as f:
        np.lib.format.write_array(f, rows, version=(3, 0))
    assert (folder / "cluster_0.npy").read_bytes()[6:8] == b"\x03\x00"
    r = run_script(DINTRA_SCRIPT, "--sorted_clusters_path", folder, "--avg_distance_to_cent_save_path",
                   tmp_path / "dintra.npy")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "dintra.npy"), [0.375])


def test_dinter_finds_centroids_beside_a_linked_sorted_folder(desc_str, tmp_path):
    """SAVE/sorted as a symbolic link to elsewhere: the centroids beside the link's target are found,
    and the summary names the file used."""
    real = tmp_path / "semdedup_save"
    shutil.copytree(desc_str["sorted"], real / "sorted")
    np.save(real / "kmeans_centroids.npy", desc_str["centroids"])
    (tmp_path / "project").mkdir()
    os.symlink(real / "sorted", tmp_path / "project" / "sorted")
    out = tmp_path / "dinter.npy"
    r = run_script(DINTER_SCRIPT, "--sorted_clusters_path", tmp_path / "project" / "sorted",
                   "--mean_centroid_distances_save_path", out)
    assert r.returncode == 0, r.stderr
    assert f"from {real / 'kmeans_centroids.npy'}" in r.stdout
    np.testing.assert_allclose(np.load(out), brute_dinter(desc_str["centroids"], 20), atol=1e-5)
