"""The quickstart's demo runs the paper's pipeline end to end (cluster with a large k, deduplicate, cluster the
kept rows with --subset, d_intra, d_inter, prune, a loader), chained in bash as a user chains the scripts; each
step's output is checked against what the step before it wrote."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT, brute_dinter

import dbp_utils as du

ROWS = 5000  # the demo's default is 20,000: the same steps, a quarter of the time
K = 50  # the demo's k for DBP


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHON": sys.executable, "DEMO_ROWS": str(ROWS)}
    (out / "run").mkdir(parents=True)
    (out / "run" / "params.json").write_text("{}")  # an earlier run's output: the demo replaces its own outputs
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "demo.sh"), str(out)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    # deduplication, then k-means of exactly the rows it kept, indexed into the full embeddings
    deduplicated = np.load(out / "dedup" / "eps_0.01" / "kept_keys.npy")
    assert 0.7 * ROWS < len(deduplicated) < 0.85 * ROWS  # a quarter of the rows nearly repeat another
    paths = (out / "data" / "paths.txt").read_text().splitlines()
    clusters = [np.load(out / "semdedup" / "sorted_clusters" / f"cluster_{j}.npy") for j in range(K)]
    rows = np.concatenate([c for c in clusters if c.size])
    assert sorted(k.rsplit(".", 1)[0].encode() for k in rows[:, 0]) == deduplicated.tolist()
    assert all(paths[int(i)] == k for k, i in zip(rows[:, 0], rows[:, 1]))  # column 1: rows of embeddings.npy
    params = json.loads((out / "semdedup" / "clustering.json").read_text())
    assert params["rows"] == len(deduplicated) and params["embedding_rows"] == ROWS

    # d_intra and d_inter of those clusters, from the embeddings and the centroids
    x = np.load(out / "data" / "embeddings.npy").astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids = np.load(out / "semdedup" / "kmeans_centroids.npy")
    c = centroids.astype(np.float64) / np.linalg.norm(centroids, axis=1, keepdims=True)
    expected = [np.mean(1 - x[cluster[:, 1].astype(int)] @ c[j]) if cluster.size else np.nan
                for j, cluster in enumerate(clusters)]
    np.testing.assert_allclose(np.load(out / "scores" / "dintra.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(out / "scores" / "dinter.npy"), brute_dinter(centroids, 20), atol=1e-5)

    # prune keeps 30% of what deduplication kept, and the loaders let exactly those through
    trie = du.load_trie(str(out / "run" / "kept_keys_trie.pkl"))
    assert len(trie) == int(0.3 * len(deduplicated))
    assert {k.encode() for k in trie.keys()} <= set(deduplicated.tolist())
    assert f"through a plain loop, the filter let through {len(trie)} samples" in r.stdout
    assert f"through a torch DataLoader with 2 workers, the filter let through {len(trie)} samples" in r.stdout
    assert len(os.listdir(out / "shards")) == ROWS // 1000
    kept = np.load(out / "run" / "kept_keys.npy")
    assert sorted(trie.keys()) == [k.decode() for k in kept.tolist()]
    # the figures of the README and docs come from this very run (examples/readme_figures.py)
    import readme_figures

    table = readme_figures.temperature_table(str(out / "run"))
    docs = open(os.path.join(ROOT, "docs", "scripts.md")).read()
    assert "\n".join(table) in docs, "\n".join(table)  # regenerate: python examples/readme_figures.py --run ...
    sweep = (out / "run" / "temperature_sweep.csv").read_text().splitlines()
    assert sweep[0] == "temperature,p_ratio,quota_min,quota_median,quota_max,kept_whole,at_minimum,moved_fraction"
