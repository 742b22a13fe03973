"""Runs that are killed, interrupted, lose a worker or race another run never leave half an output.

Every fault is delivered at a named stage of a real run: the run stops itself there (DBP_PAUSE_AT), the
test delivers the fault and lets it go on. Nothing depends on how fast the machine is.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import (
    DEADLINE,
    DINTER_SCRIPT,
    DINTRA_SCRIPT,
    OUTPUTS,
    PRUNE_SCRIPT,
    ROOT,
    descendants,
    error_line,
    limit_file_size,
    make,
    process_state,
    run_script,
    session_is_empty,
    start_script,
    wait_paused,
    wait_until,
    workers_of,
)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Enough clusters that tasks are still to come at every stage a fault is delivered in."""
    data = make(tmp_path_factory, "big", n=40_000, k=40, dim=8, edge_clusters=False)
    out = tmp_path_factory.mktemp("big_scores")
    for script, flag in ((DINTRA_SCRIPT, "--avg_distance_to_cent_save_path"),
                         (DINTER_SCRIPT, "--mean_centroid_distances_save_path")):
        r = run_script(script, "--sorted_clusters_path", data["sorted"], flag, out / f"{script}.npy")
        assert r.returncode == 0, r.stderr
    data["args"] = ["--mean_centroid_distances_save_path", out / f"{DINTER_SCRIPT}.npy",
                    "--avg_distance_to_cent_save_path", out / f"{DINTRA_SCRIPT}.npy",
                    "--sorted-clusters-path", data["sorted"], "--prune-ratio", "0.9"]
    return data


@pytest.fixture(scope="module")
def reference(big, tmp_path_factory):
    """What an uninterrupted run writes."""
    save_dir = tmp_path_factory.mktemp("reference") / "run"
    r = run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir)
    assert r.returncode == 0, r.stderr
    return comparable(save_dir)


def comparable(save_dir):
    """The outputs in sight, as what must match between runs: params.json without the save dir it
    records, the log without its times. A killed run may also leave its staging folder and lock file."""
    assert set(os.listdir(save_dir)) <= set(OUTPUTS) | {".dbp_staging", ".dbp_lock"}
    found = {name: (save_dir / name).read_bytes() for name in os.listdir(save_dir) if not name.startswith(".")}
    if "logs.log" in found:
        found["logs.log"] = [line.split(" ", 2)[2] for line in found["logs.log"].decode().splitlines()
                             if " INFO k=" in line or "WARNING" in line]
    if "params.json" in found:
        params = json.loads(found["params.json"])
        params.pop("save_dir")
        found["params.json"] = params
    return found


def snapshot(folder):
    """Every path under folder, each file with its bytes and modification time (a folder's own time changes
    with what is made and removed in it, so only what it holds is compared)."""
    state = {}
    for where, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(where, name)
            state[path] = None if name in dirs else (os.stat(path).st_mtime_ns, open(path, "rb").read())
    return state


def start_prune(big, save_dir, *extra, pause=None, **popen):
    return start_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--workers", "2", *extra, pause=pause,
                        **popen)


STAGES = ["select started", "select under way", "writing the trie"]  # prune's, in order


def wait_ended(proc):
    """stdout, stderr and exit status of a faulted run, which must end within DEADLINE seconds."""
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run hung: still running {DEADLINE} s after the fault")
    return out, err, proc.returncode


def assert_one_line(err, *expected):
    """One error line, on a line of its own; before it at most the progress bars the run had drawn."""
    line = error_line(err)
    assert all(text in line for text in expected), err


def test_same_inputs_give_identical_outputs_for_any_workers(big, reference, tmp_path):
    r = run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", tmp_path / "run", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert comparable(tmp_path / "run") == reference and sorted(reference) == sorted(OUTPUTS)


@pytest.mark.parametrize("stage", STAGES)
def test_killed_prune_leaves_no_half_output_and_rerun_finishes(big, reference, tmp_path, stage):
    save_dir = tmp_path / "run"
    proc = start_prune(big, save_dir, pause=stage)
    wait_paused(proc, stage)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, as the OOM killer or a crash would
    wait_ended(proc)
    assert not (save_dir / "params.json").exists()
    assert all(reference[n] == b for n, b in comparable(save_dir).items())  # what is in sight is whole
    r = run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir)
    assert r.returncode == 0, r.stderr
    assert comparable(save_dir) == reference


FAULTS = {"ctrl-c": (130, "interrupted (Ctrl-C)"), "sigterm": (143, "terminated (SIGTERM)"),
          "sigterm to all": (143, "terminated (SIGTERM)"), "worker killed": (1, "a worker process died")}


@pytest.mark.parametrize("stage,fault,existing", [
    ("select started", "ctrl-c", False), ("select started", "sigterm to all", False),
    ("select started", "worker killed", False), ("select under way", "ctrl-c", False),
    ("select under way", "sigterm", False), ("select under way", "worker killed", False),
    ("select under way", "ctrl-c", True), ("select under way", "worker killed", True)])
def test_faults_end_in_one_line_and_roll_back(big, tmp_path, stage, fault, existing):
    status, message = FAULTS[fault]
    save_dir = tmp_path / "run"
    extra = []
    if existing:  # a completed run that --overwrite would replace: it must survive the fault whole
        assert run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--prune-ratio", "0.5").returncode == 0
        extra = ["--overwrite"]
    before = snapshot(tmp_path)
    proc = start_prune(big, save_dir, *extra, pause=stage)
    wait_paused(proc, stage)
    if fault == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: to the run and its workers
    elif fault == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)  # what kill and timeout send
    elif fault == "sigterm to all":
        os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler sends to the whole job
    else:
        os.kill(workers_of(proc.pid)[0], signal.SIGKILL)  # what the OOM killer does to a worker
    os.kill(proc.pid, signal.SIGCONT)
    out, err, returncode = wait_ended(proc)
    assert returncode == status, err
    assert_one_line(err, message)
    assert "Traceback" not in err and "Exception" not in err and out == ""
    assert snapshot(tmp_path) == before
    wait_until(lambda: session_is_empty(proc.pid), what="the run's workers and fork server to end")


def test_workers_die_quietly_with_a_killed_run(big, tmp_path):
    proc = start_prune(big, tmp_path / "run", pause="select under way")
    wait_paused(proc, "select under way")
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    everyone = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the run alone: its workers must not live on as orphans
    _, err, _ = wait_ended(proc)  # stderr closes only once every process holding it has ended
    assert err == "", "the workers of a killed run print nothing"
    wait_until(lambda: all(process_state(p) in (None, "Z") for p in everyone), what="the workers to end")


@pytest.mark.parametrize("existing", [False, True])
def test_a_second_run_on_the_same_save_dir_is_refused(big, reference, tmp_path, existing):
    save_dir = tmp_path / "run"
    if existing:
        assert run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--prune-ratio", "0.5").returncode == 0
    first = start_prune(big, save_dir, *(["--overwrite"] if existing else []), pause="select under way")
    wait_paused(first, "select under way")
    second = run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--overwrite", "--prune-ratio", "0.2")
    assert second.returncode == 2
    assert_one_line(second.stderr, "in use by another run", f"pid {first.pid}")
    os.kill(first.pid, signal.SIGCONT)
    out, err, returncode = wait_ended(first)
    assert returncode == 0, err
    assert comparable(save_dir) == reference  # the first run's outputs alone, whole
    assert not (save_dir / ".dbp_lock").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_ends_in_one_line_and_rolls_back(big, tmp_path, existing):
    save_dir = tmp_path / "run"
    extra = []
    if existing:
        assert run_script(PRUNE_SCRIPT, *big["args"], "--save-dir", save_dir, "--prune-ratio", "0.5").returncode == 0
        extra = ["--overwrite"]
    before = snapshot(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, PRUNE_SCRIPT), *map(str, big["args"]), "--save-dir", str(save_dir),
           "--workers", "2", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=limit_file_size(1 << 18))  # kept_paths.txt alone is ~0.9 MB
    out, err, returncode = wait_ended(proc)
    assert returncode == 1
    assert_one_line(err, f"error: {save_dir}: File too large", "free disk space")
    assert snapshot(tmp_path) == before


def test_dintra_on_a_full_disk_leaves_no_folders_behind(big, tmp_path):
    out = tmp_path / "new" / "deeper" / "dintra.npy"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, DINTRA_SCRIPT), "--sorted_clusters_path",
                             big["sorted"], "--avg_distance_to_cent_save_path", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit_file_size(100))
    _, err, returncode = wait_ended(proc)
    assert returncode == 1
    assert_one_line(err, f"error: {out}: File too large")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script,flag", [(DINTRA_SCRIPT, "--avg_distance_to_cent_save_path"),
                                         (DINTER_SCRIPT, "--mean_centroid_distances_save_path")])
def test_a_full_disk_cutting_a_small_npy_short_is_an_error_and_the_file_there_stays(big, tmp_path, script, flag):
    """numpy writes a small array through a C stream whose failed last write it never looks at: the file came out
    cut short, was renamed over the user's, and its sidecar (smaller) still fitted: the run succeeded."""
    good = os.path.join(os.path.dirname(big["args"][1]), f"{script}.npy")
    out = tmp_path / "scores.npy"
    for suffix in ("", ".dbp.json"):
        shutil.copy(good + suffix, str(out) + suffix)
    before = snapshot(tmp_path)
    size = os.path.getsize(good)  # 128 bytes of header and 40 float32
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--sorted_clusters_path", big["sorted"],
                             flag, out, "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_file_size(size - 8))
    _, err, returncode = wait_ended(proc)
    assert returncode == 1, err
    assert_one_line(err, f"error: {out}: a write stopped short ({size - 8} of {size} bytes written)")
    assert snapshot(tmp_path) == before


def test_a_reader_that_closed_stdout_is_named_and_the_outputs_stay(big, reference, tmp_path):
    """`prune.py ... | head -c0`: the summary line, printed once the outputs are published, met a closed pipe. The line
    blamed "system" and told to check the disk."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the run writes
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, PRUNE_SCRIPT), *map(str, big["args"]), "--save-dir",
                             str(tmp_path / "run")], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1
    assert_one_line(err, "error: stdout: the program reading it has closed it (broken pipe): the summary line "
                    "could not be written")
    assert comparable(tmp_path / "run") == reference


def test_progress_bar_and_summary_keep_their_own_lines_in_one_log(big, tmp_path):
    """stdout and stderr to one file (2>&1, as on SLURM): the bar's line ends before the summary. TQDM_DELAY=0
    (tqdm's own variable) draws the bar at once, however fast the run."""
    cmd = [sys.executable, os.path.join(ROOT, PRUNE_SCRIPT), *map(str, big["args"]), "--save-dir",
           str(tmp_path / "run"), "--workers", "1"]
    with open(tmp_path / "job.log", "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DELAY": "0"})
    assert r.returncode == 0
    lines = (tmp_path / "job.log").read_text().split("\n")
    assert any(line.startswith("\rselect:") or line.startswith("select:") for line in lines), "no bar was drawn"
    assert [line for line in lines if "kept " in line] == [line for line in lines if line.startswith("kept ")]
    assert sum(line.startswith("kept ") for line in lines) == 1
