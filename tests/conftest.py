"""Shared fixtures: SemDeDup-style data sets from real faiss k-means, and a script runner."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

import make_toy_clusters  # noqa: E402

DINTRA_SCRIPT = "compute_avg_dist_to_cluster_centroid.py"
DINTER_SCRIPT = "compute_centroid_distances.py"
PRUNE_SCRIPT = "prune.py"
CLUSTER_SCRIPT = "cluster_embeddings.py"
# prune.py's outputs, by the names the SPEC gives them (written out, not taken from dbp_utils).
OUTPUTS = ["kept_keys_trie.pkl", "kept_keys.npy", "kept_paths.txt", "quotas.npy", "cluster_stats.csv",
           "params.json", "quotas.png", "logs.log"]


def run_script(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run one of the scripts as a user would, capturing its output."""
    args = [str(a) for a in args]
    if "--workers" not in args:
        args += ["--workers", "2"]
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=cwd)


def make(tmp_path_factory, name: str, **kwargs) -> dict:
    out = tmp_path_factory.mktemp(name)
    defaults = dict(n=2400, k=12, dim=16, seed=3, shard_size=100, edge_clusters=True)
    return make_toy_clusters.make_dataset(str(out), **{**defaults, **kwargs})


@pytest.fixture(scope="session")
def desc_str(tmp_path_factory):
    """Descending files (keep_hard=True) with str paths, plus empty, 1- and 2-member clusters."""
    return make(tmp_path_factory, "desc_str")


@pytest.fixture(scope="session")
def asc_bytes(tmp_path_factory):
    """Ascending files (keep_hard=False) with bytes paths, as from SemDeDup's S24 memmap."""
    return make(tmp_path_factory, "asc_bytes", seed=5, descending=False, bytes_paths=True)


@pytest.fixture(scope="session")
def nemo_three(tmp_path_factory):
    """NeMo Curator 0.4-0.7's files: three columns (id, distance, cluster id), descending."""
    return make(tmp_path_factory, "nemo_three", seed=7, three_columns=True)


@pytest.fixture(params=["desc_str", "asc_bytes", "nemo_three"])
def dataset(request):
    return request.getfixturevalue(request.param)


def brute_dintra(data: dict) -> np.ndarray:
    """Mean cosine distance of each cluster's members to its centroid, from the embeddings."""
    x, c, labels = data["x"].astype(np.float64), data["centroids"].astype(np.float64), data["labels"]
    out = np.full(data["k"], np.nan)
    for j in range(data["k"]):
        members = x[labels == j]
        if len(members):
            out[j] = np.mean(1 - members @ c[j])
    return out


def brute_dinter(centroids: np.ndarray, l: int) -> np.ndarray:
    """Mean cosine distance from each centroid to its l nearest others, by full sort."""
    c = centroids.astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    sims = c @ c.T
    k = len(c)
    out = np.empty(k)
    for j in range(k):
        others = np.sort(np.delete(sims[j], j))[::-1][: min(l, k - 1)]
        out[j] = np.mean(1 - others)
    return out
