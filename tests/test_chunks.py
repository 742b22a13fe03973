"""Chunk, window and task sizes change no byte: the scripts run with every such size cut to a few rows (so that
each loop over chunks turns many times, and each boundary falls inside a part, a cluster or a sample) give the
same outputs as the default run, whose sizes are larger than these inputs. At LAION's size every loop turns;
in the other tests almost none does."""

import os
import subprocess
import sys

import pytest
from conftest import (
    CLUSTER_SCRIPT,
    DINTER_SCRIPT,
    DINTRA_SCRIPT,
    PRUNE_SCRIPT,
    ROOT,
    outputs,
    run_script,
)
from test_cluster_embeddings import embeddings, layout

SMALL = {  # module: {constant: a few rows (or bytes)}; modules that import a constant by name are listed too
    "dbpkit.layouts": {"CHUNK_ROWS": 7},
    "dbpkit.files": {"WINDOW_BYTES": 200},  # three rows of dim 16 a mapping
    "dbpkit.kmeans": {"CHUNK_ROWS": 7, "ASSIGN_ROWS": 50},
    "dbpkit.clusters": {"CHUNK_ROWS": 5},
    "dbpkit.selection": {"CHUNK_ROWS": 5, "MIN_PIECE_KEYS": 4},
    "dbpkit.keys": {"KEY_CHUNK_ROWS": 6, "TEXT_BLOCK_BYTES": 9},
    "dbpkit.trie": {"TRIE_CHUNK_KEYS": 3},
    "dbp_utils": {"SCAN_KEYS": 5, "SWEEP_CHUNK": 7},
}
# Runs a script with the sizes above, in one process (--workers 1: its tasks run where the sizes were set).
SMALL_RUN = """
import importlib, runpy, sys
small = {{importlib.import_module(module): sizes for module, sizes in {small!r}.items()}}  # all, before any is set
for module, sizes in small.items():
    for name, size in sizes.items():
        assert getattr(module, name) > size, name  # it exists, and this makes it smaller
        setattr(module, name, size)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_small(script: str, *args) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    return subprocess.run([sys.executable, "-c", SMALL_RUN.format(small=SMALL), os.path.join(ROOT, script), *args,
                           "--workers", "1"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


def pipeline(run, data: list, root, steps: int) -> list[str]:
    """Clusters, SemDeDup, clusters of the rows kept (with a k sweep), d_intra, d_inter, prune, as the README
    chains them: the first `steps` of them. Returns the folders they wrote."""
    chain = [
        ("c1", CLUSTER_SCRIPT, *data, "--num_clusters", 9, "--save_folder", root / "c1"),
        ("dedup", "deduplicate.py", "--sorted_clusters_path", root / "c1" / "sorted_clusters", "--eps", 0.002, 0.01,
         "--save_folder", root / "dedup"),
        ("c2", CLUSTER_SCRIPT, *data, "--subset", root / "dedup" / "eps_0.01" / "kept_keys.npy", "--num_clusters", 6,
         "--k-sweep", 3, 6, "--save_folder", root / "c2"),
        ("scores", DINTRA_SCRIPT, "--num_clusters", 6, "--sorted_clusters_path", root / "c2" / "sorted_clusters",
         "--avg_distance_to_cent_save_path", root / "scores" / "dintra.npy"),
        ("scores", DINTER_SCRIPT, "--num_clusters", 6, "--sorted_clusters_path", root / "c2" / "sorted_clusters",
         "--mean_centroid_distances_save_path", root / "scores" / "dinter.npy"),
        ("run", PRUNE_SCRIPT, "--num-centroids", 6, "--mean_centroid_distances_save_path",
         root / "scores" / "dinter.npy", "--avg_distance_to_cent_save_path", root / "scores" / "dintra.npy",
         "--sorted-clusters-path", root / "c2" / "sorted_clusters", "--prune-ratio", 0.3, "--save-dir", root / "run"),
    ]
    for _, script, *args in chain[:steps]:
        r = run(script, *args)
        assert r.returncode == 0, (script, r.stderr)
    return sorted({folder for folder, *_ in chain[:steps]})


@pytest.mark.parametrize("kind,steps", [("clip-retrieval", 6), ("npy+txt", 1), ("datacomp", 1)])
def test_small_chunks_give_the_same_bytes(kind, steps, tmp_path):
    """The whole chain on clip-retrieval's parts; the clustering alone on the other layouts' readers."""
    data, _ = layout(tmp_path, kind, embeddings(n=800, seed=4))
    pipeline(lambda script, *args: run_script(script, *args, "--workers", 1), data, tmp_path / "default", steps)
    for folder in pipeline(run_small, data, tmp_path / "small", steps):
        default, small = outputs(tmp_path / "default" / folder), outputs(tmp_path / "small" / folder)
        assert default and small.keys() == default.keys(), folder
        for record in [name for name in small if name.suffix == ".json"]:  # records name the run's folders
            small[record] = small[record].replace(str(tmp_path / "small").encode(), str(tmp_path / "default").encode())
        assert [name for name in default if small[name] != default[name]] == [], folder
