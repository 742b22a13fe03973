"""The quickstart's demo runs end to end and leaves a trie that filters its webdataset exactly."""

import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

import dbp_utils as du


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHON": sys.executable}
    for _ in range(2):  # a rerun replaces the demo's own outputs
        r = subprocess.run(["bash", os.path.join(ROOT, "examples", "demo.sh"), str(out)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    trie = du.load_trie(str(out / "run" / "kept_keys_trie.pkl"))
    assert len(trie) == 6000 == int(0.3 * 20000)
    assert "through a plain loop, the filter let through 6000 samples" in r.stdout
    assert "through a torch DataLoader with 2 workers, the filter let through 6000 samples" in r.stdout
    assert len(os.listdir(out / "shards")) == 20
    kept = np.load(out / "run" / "kept_keys.npy")
    assert sorted(trie.keys()) == [k.decode() for k in kept.tolist()]
