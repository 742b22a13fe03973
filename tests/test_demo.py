"""The quickstart's demo runs the paper's pipeline end to end and leaves a trie that filters its webdataset."""

import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

import dbp_utils as du

ROWS = 5000  # the demo's default is 20,000: the same steps, a quarter of the time


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHON": sys.executable, "DEMO_ROWS": str(ROWS)}
    (out / "run").mkdir(parents=True)
    (out / "run" / "params.json").write_text("{}")  # an earlier run's output: the demo replaces its own outputs
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "demo.sh"), str(out)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    deduplicated = np.load(out / "dedup" / "eps_0.01" / "kept_keys.npy")
    assert 0.7 * ROWS < len(deduplicated) < 0.85 * ROWS  # a quarter of the rows nearly repeat another
    trie = du.load_trie(str(out / "run" / "kept_keys_trie.pkl"))
    assert len(trie) == int(0.3 * len(deduplicated))  # prune keeps 30% of what deduplication kept
    assert {k.encode() for k in trie.keys()} <= set(deduplicated.tolist())
    assert f"through a plain loop, the filter let through {len(trie)} samples" in r.stdout
    assert f"through a torch DataLoader with 2 workers, the filter let through {len(trie)} samples" in r.stdout
    assert len(os.listdir(out / "shards")) == ROWS // 1000
    kept = np.load(out / "run" / "kept_keys.npy")
    assert sorted(trie.keys()) == [k.decode() for k in kept.tolist()]
