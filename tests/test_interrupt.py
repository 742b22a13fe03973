"""A killed prune leaves no half-written output and a rerun finishes it; runs are byte-identical."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import DINTER_SCRIPT, DINTRA_SCRIPT, OUTPUTS, PRUNE_SCRIPT, ROOT, make, run_script


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Large enough that a prune takes a second or two, so it can be killed mid-way."""
    data = make(tmp_path_factory, "big", n=200_000, k=40, dim=8, edge_clusters=False)
    out = tmp_path_factory.mktemp("big_scores")
    for script, flag in ((DINTRA_SCRIPT, "--avg_distance_to_cent_save_path"),
                         (DINTER_SCRIPT, "--mean_centroid_distances_save_path")):
        r = run_script(script, "--sorted_clusters_path", data["sorted"], flag, out / f"{script}.npy")
        assert r.returncode == 0, r.stderr
    data["args"] = ["--mean_centroid_distances_save_path", out / f"{DINTER_SCRIPT}.npy",
                    "--avg_distance_to_cent_save_path", out / f"{DINTRA_SCRIPT}.npy",
                    "--sorted-clusters-path", data["sorted"], "--prune-ratio", "0.9"]
    return data


def read_outputs(save_dir):
    """The outputs in sight; a killed run may also leave its hidden staging folder."""
    assert set(os.listdir(save_dir)) <= set(OUTPUTS) | {".dbp_staging"}
    return {name: (save_dir / name).read_bytes() for name in os.listdir(save_dir) if not name.startswith(".")}


def test_same_inputs_give_byte_identical_outputs(big, tmp_path):
    save_dir = tmp_path / "run"
    assert run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--workers", "1").returncode == 0
    first = read_outputs(save_dir)
    assert sorted(first) == sorted(OUTPUTS)
    r = run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--workers", "2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert read_outputs(save_dir) == first


def start_prune(big, save_dir):
    cmd = [sys.executable, os.path.join(ROOT, PRUNE_SCRIPT), *map(str, big["args"]), "--save-dir", str(save_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc, save_dir, delay, writing_outputs):
    """SIGKILL after `delay` s, or as soon as outputs are being written (the staging folder fills)."""
    staging = save_dir / ".dbp_staging"
    start = time.monotonic()
    while proc.poll() is None:
        writing = writing_outputs and staging.exists() and any(os.scandir(staging))
        if writing or (not writing_outputs and time.monotonic() - start > delay):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()


@pytest.mark.parametrize("fraction,writing", [(0.0, True), (0.3, False), (0.6, False), (0.9, False)])
def test_killed_prune_leaves_no_half_output_and_rerun_finishes(big, tmp_path, fraction, writing):
    reference_dir = tmp_path / "reference"
    save_dir = tmp_path / "run"
    # Both runs write to the same path so that params.json (which records it) matches too.
    start = time.monotonic()
    assert run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir).returncode == 0
    duration = time.monotonic() - start
    os.rename(save_dir, reference_dir)
    reference = read_outputs(reference_dir)

    proc = start_prune(big, save_dir)
    kill_when(proc, save_dir, fraction * duration, writing)
    if (save_dir / "params.json").exists():  # complete before the kill landed: nothing to resume
        assert read_outputs(save_dir) == reference
        return
    if save_dir.exists():  # every output in sight is whole: exactly what the uninterrupted run wrote
        assert all(reference[n] == b for n, b in read_outputs(save_dir).items())
    r = run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir)
    assert r.returncode == 0, r.stderr
    assert read_outputs(save_dir) == reference
