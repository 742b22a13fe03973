"""What a researcher reads: --help and --version, one rule for existing outputs, the score sidecars, and
prune's log, params.json, pruned_paths.txt and plot."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import CLUSTER_SCRIPT, DINTER_SCRIPT, DINTRA_SCRIPT, OUTPUTS, PRUNE_SCRIPT, error_line, run_script

import dbpkit

SCRIPTS = (CLUSTER_SCRIPT, DINTRA_SCRIPT, DINTER_SCRIPT, PRUNE_SCRIPT)
REQUIRED = {CLUSTER_SCRIPT: ["--embeddings", "--num_clusters", "--save_folder"],
            DINTRA_SCRIPT: ["--sorted_clusters_path", "--avg_distance_to_cent_save_path"],
            DINTER_SCRIPT: ["--mean_centroid_distances_save_path"],
            PRUNE_SCRIPT: ["--sorted-clusters-path", "--prune-ratio", "--save-dir"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_version_and_required_flags_in_the_usage_line(script):
    r = run_script(script, "--version")
    assert r.returncode == 0 and r.stdout.strip().endswith(dbpkit.__version__)
    usage = " ".join(run_script(script, "--help").stdout.split("\n\n")[0].split())
    for flag in REQUIRED[script]:
        assert re.search(rf"[ (]{re.escape(flag)} ", usage), usage
    first_form = usage.split(f"{script} ")[1]  # (cluster_embeddings.py has a second form, the NeMo conversion)
    for flag in REQUIRED[script]:
        assert f"[{flag} " not in first_form, usage
    assert "[--workers WORKERS]" in usage


def test_prune_ratio_says_it_is_the_fraction_to_keep(tmp_path):
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", tmp_path, "--prune-ratio", 30, "--save-dir", tmp_path / "r")
    assert r.returncode == 2
    assert "--prune-ratio: 30.0 is outside (0, 1] (it is the fraction to keep: 0.3 keeps 30%" in r.stderr


def run_scores(data, out, *extra, cwd=None):
    return [run_script(DINTRA_SCRIPT, "--sorted_clusters_path", data["sorted"], "--avg_distance_to_cent_save_path",
                       out / "dintra.npy", *extra, cwd=cwd),
            run_script(DINTER_SCRIPT, "--sorted_clusters_path", data["sorted"], "--mean_centroid_distances_save_path",
                       out / "dinter.npy", *extra, cwd=cwd)]


def test_existing_score_files_need_overwrite_and_swaps_are_refused(desc_str, tmp_path):
    assert all(r.returncode == 0 for r in run_scores(desc_str, tmp_path))
    sidecar = json.loads((tmp_path / "dintra.npy.dbp.json").read_text())
    assert sidecar["holds"] == "d_intra" and sidecar["clusters"] == desc_str["k"]
    assert np.load(tmp_path / "dintra.npy").dtype == np.float32  # still the plain array upstream code reads
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    for r in run_scores(desc_str, tmp_path):
        assert r.returncode == 2 and "already exists (pass --overwrite" in r.stderr
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert all(r.returncode == 0 for r in run_scores(desc_str, tmp_path, "--overwrite"))

    def prune(intra, inter, save):
        return run_script(PRUNE_SCRIPT, "--sorted-clusters-path", desc_str["sorted"], "--prune-ratio", 0.3,
                          "--avg_distance_to_cent_save_path", intra, "--mean_centroid_distances_save_path", inter,
                          "--save-dir", tmp_path / save)
    r = prune(tmp_path / "dinter.npy", tmp_path / "dintra.npy", "swapped")
    assert r.returncode == 2 and "dinter.npy holds d_inter, not d_intra" in r.stderr and "swapped" in r.stderr
    assert not (tmp_path / "swapped").exists()
    for name in ("dintra", "dinter"):  # files from elsewhere (no sidecar, or one about another file) read as today
        os.rename(tmp_path / f"{name}.npy", tmp_path / f"{name}_copy.npy")
        np.save(tmp_path / f"{name}.npy", np.load(tmp_path / f"{name}_copy.npy") + 0.1)
    assert prune(tmp_path / "dinter_copy.npy", tmp_path / "dintra_copy.npy", "no_sidecar").returncode == 0
    assert prune(tmp_path / "dintra.npy", tmp_path / "dinter.npy", "stale_sidecar").returncode == 0


def test_scores_made_from_another_clustering_of_the_same_k_are_refused(desc_str, asc_bytes, tmp_path):
    """Two k-means runs of the same k: d_intra and d_inter made from one, passed with the other's clusters, set the
    quotas from the wrong clusters without a word."""
    sizes = [[len(np.load(os.path.join(data["sorted"], f"cluster_{j}.npy"))) for j in range(data["k"])]
             for data in (desc_str, asc_bytes)]
    assert desc_str["k"] == asc_bytes["k"] and sizes[0] != sizes[1]
    assert all(r.returncode == 0 for r in run_scores(desc_str, tmp_path))

    def prune(data, save, density="dintra*dinter"):
        scores = [(flag, tmp_path / name) for flag, name in (("--avg_distance_to_cent_save_path", "dintra.npy"),
                                                             ("--mean_centroid_distances_save_path", "dinter.npy"))
                  if name[:6] in density]
        return run_script(PRUNE_SCRIPT, "--sorted-clusters-path", data["sorted"], "--prune-ratio", 0.3, "--density",
                          density, *[arg for pair in scores for arg in pair], "--save-dir", tmp_path / save)
    for flag, name, script, density in (
            ("--avg_distance_to_cent_save_path", "dintra", "compute_avg_dist_to_cluster_centroid.py", "dintra"),
            ("--mean_centroid_distances_save_path", "dinter", "compute_centroid_distances.py", "dinter")):
        r = prune(asc_bytes, "other", density)
        assert r.returncode == 2, r.stderr
        assert error_line(r.stderr) == (
            f"error: {flag}: {tmp_path / name}.npy was computed from other clusters ({desc_str['sorted']}, as they "
            f"were then): their sizes differ from those of the {asc_bytes['k']} clusters given (recompute it with "
            f"{script} on --sorted-clusters-path)")
        assert not (tmp_path / "other").exists()
    assert prune(desc_str, "same").returncode == 0
    # d_inter made from the centroids alone knows no cluster sizes: read as it is
    r = run_script(DINTER_SCRIPT, "--centroids_file", os.path.join(os.path.dirname(desc_str["sorted"]),
                   "kmeans_centroids.npy"), "--mean_centroid_distances_save_path", tmp_path / "dinter.npy",
                   "--overwrite")
    assert r.returncode == 0, r.stderr
    assert prune(asc_bytes, "centroids_only", "dinter").returncode == 0


def test_prune_reports(desc_str, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # paths from a "~" the shell left alone (quoted, or from a file)
    (tmp_path / "scores").mkdir()
    assert all(r.returncode == 0 for r in run_scores(desc_str, Path("~"), cwd=tmp_path / "scores"))
    sorted_dir = os.path.relpath(desc_str["sorted"], tmp_path)  # and paths relative to where it runs
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", sorted_dir, "--prune-ratio", 0.3,
                   "--avg_distance_to_cent_save_path", "~/dintra.npy", "--mean_centroid_distances_save_path",
                   "dinter.npy", "--save-dir", "run", "--pruned-paths", "--total-dataset-size", 3000, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == sorted(OUTPUTS + ["pruned_paths.txt"])

    params = json.loads((run / "params.json").read_text())
    for name in ("sorted_clusters_path", "save_dir", "avg_distance_to_cent_save_path",
                 "mean_centroid_distances_save_path"):
        assert os.path.isabs(params[name]) and os.path.exists(params[name])
    assert params["avg_distance_to_cent_save_path"] == str(tmp_path / "dintra.npy")
    assert params["num_centroids"] == desc_str["k"] and params["version"] == dbpkit.__version__

    kept = (run / "kept_paths.txt").read_text().splitlines()
    pruned = (run / "pruned_paths.txt").read_text().splitlines()
    assert not set(kept) & set(pruned) and sorted(kept + pruned) == sorted(desc_str["paths"])

    log = (run / "logs.log").read_text().splitlines()
    assert f"density-based-pruning {dbpkit.__version__}: " in log[0] and "--save-dir run" in log[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", log[0]) and "finished after" in log[-1]
    assert any("WARNING --total-dataset-size 3000 differs" in line for line in log)
    summary = next(line for line in log if "most pruned:" in line)
    quotas, sizes = np.load(run / "quotas.npy"), np.bincount(desc_str["labels"], minlength=desc_str["k"])
    fraction = np.where(sizes > 0, quotas / np.maximum(sizes, 1), np.inf)
    most = int(np.argmin(fraction))
    assert f"most pruned: cluster {most} keeps {quotas[most]} of {sizes[most]}" in summary
    assert (run / "quotas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
