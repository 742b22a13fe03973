"""--distributor ray, on a real local Ray: the same bytes as a local run, a killed task worker retried, an input
a node cannot see named, no Ray process left behind by a run that started its own, and the line that says how to
install Ray."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CLUSTER_SCRIPT, ROOT, error_line, outputs, process_state, start_script, wait_paused, wait_until
from test_dedup import DEDUP_SCRIPT, EPS, make_data
from test_embed import EMBED_SCRIPT, make_toy_images

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


TOKEN = "dbp-test-token-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray cluster on this machine, as `ray start --head` makes one, joined with RAY_ADDRESS=auto: on free ports
    (never Ray's defaults: another Ray may run here), with token authentication, a logical GPU (for the
    scheduling of GPU tasks), and started in a folder of its own, where its workers start too."""
    elsewhere = tmp_path_factory.mktemp("ray_start_folder")
    ports = {flag: free_port() for flag in ("--port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--metrics-export-port",
                                            "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    # In a session of its own, which every process of the cluster stays in: it is stopped by that session, never with
    # `ray stop`, which stops every Ray on the machine (a run's own Ray in another test, starting: 'The current node
    # timed out during startup', seen in CI).
    start = subprocess.Popen([RAY, "start", "--head", "--num-cpus", "2", "--num-gpus", "1", "--disable-usage-stats",
                              "--include-dashboard=false", *(str(a) for item in ports.items() for a in item)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=elsewhere, env=env,
                             start_new_session=True)
    said = start.communicate()
    try:
        assert start.returncode == 0, "".join(said)
        yield {**env, "RAY_ADDRESS": "auto"}
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(start.pid)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Clusters to deduplicate, embeddings in clip-retrieval's layout (8 parts: 8 assignment tasks), shards."""
    root = tmp_path_factory.mktemp("ray_data")
    dedup = make_data(root / "dedup")
    (root / "img_emb").mkdir()
    (root / "metadata").mkdir()
    x = np.random.default_rng(0).standard_normal((2400, 16)).astype(np.float32)
    for n in range(8):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", x[n * 300:(n + 1) * 300])
        pd.DataFrame({"image_path": [f"{n:05d}/{i:09d}" for i in range(n * 300, (n + 1) * 300)]}).to_parquet(
            root / "metadata" / f"metadata_{n}.parquet")
    shards = make_toy_images.make_shards(str(root / "shards"), 40, 20, seed=2)
    model = make_toy_images.save_tiny_dinov2(str(root / "model"))
    return {"root": root, "dedup": dedup, "img_emb": root / "img_emb", "shards": shards, "model": model,
            "pattern": str(root / "shards" / "{00000..00001}.tar")}


def ray_processes():
    """The Ray processes on this machine (its GCS, raylets and workers), by pid."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if any(name in command for name in (b"gcs_server", b"raylet", b"default_worker.py", b"ray::")):
            found.add(int(pid))
    return found


def script(name, *args, env, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def run(name, args, out, distributor, env, cwd=None):
    """One command with --distributor local or ray; its outputs."""
    r = script(name, *args, "--save_folder" if name != EMBED_SCRIPT else "--output_folder", out,
               "--distributor", distributor, env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (" on Ray" in r.stdout) == (distributor == "ray"), r.stdout
    return outputs(Path(cwd or "", out))


def dedup_args(data):
    return ["--sorted_clusters_path", data["dedup"]["sorted"], "--embeddings", data["dedup"]["emb"], "--eps", *EPS]


@pytest.fixture(scope="module")
def dedup_local(data, tmp_path_factory):
    """deduplicate.py's outputs from the local process pool: what every Ray run must reproduce."""
    return run(DEDUP_SCRIPT, dedup_args(data), tmp_path_factory.mktemp("dedup") / "local", "local", os.environ)


def test_the_same_bytes_as_a_local_run_from_relative_paths(cluster, data, dedup_local, tmp_path):
    """The Ray runs name every path relative to the folder they start in, not the one Ray's workers start in."""
    import json

    root = data["root"]
    args = ["--embeddings", data["img_emb"], "--num_clusters", 12, "--niter", 5]
    local = run(CLUSTER_SCRIPT, args, tmp_path / "cluster_local", "local", cluster)
    relative = ["--embeddings", "img_emb", "--num_clusters", 12, "--niter", 5]
    on_ray = run(CLUSTER_SCRIPT, relative, tmp_path / "cluster_ray", "ray", cluster, cwd=root)
    records = [json.loads(outputs.pop(Path("clustering.json"))) for outputs in (local, on_ray)]
    assert on_ray == local and len(local) == 14  # (with clusters.png)
    assert [r.pop("distributor") for r in records] == ["local", "ray"]
    assert records[0] == records[1]  # the embeddings named by the same absolute path, the same figures
    relative = ["--sorted_clusters_path", os.path.relpath(data["dedup"]["sorted"], root), "--embeddings",
                os.path.relpath(data["dedup"]["emb"], root), "--eps", *EPS]
    assert run(DEDUP_SCRIPT, relative, os.path.relpath(tmp_path / "dedup", root), "ray", cluster, cwd=root) == \
        dedup_local
    args = ["--shards", data["pattern"], "--model", data["model"], "--batch-size", 8]
    local = run(EMBED_SCRIPT, args, tmp_path / "embed_local", "local", cluster)
    relative = ["--shards", "shards/{00000..00001}.tar", "--model", "model", "--batch-size", 8]
    assert run(EMBED_SCRIPT, relative, tmp_path / "embed_ray", "ray", cluster, cwd=root) == local
    assert sum(name.parts[0] == "img_emb" for name in local) == 2
    assert json.loads((tmp_path / "embed_ray" / "params.json").read_text())["distributor"] == "ray"


def test_the_report_read_on_ray_is_the_local_report(cluster, data, tmp_path):
    """make_report.py's shard pass as Ray tasks: the same pages, thumbnails and report.json."""
    sorted_dir = tmp_path / "clusters" / "sorted_clusters"
    steps = [(EMBED_SCRIPT, "--shards", data["pattern"], "--model", data["model"], "--batch-size", 8,
              "--output_folder", tmp_path / "emb"),
             (CLUSTER_SCRIPT, "--embeddings", tmp_path / "emb" / "img_emb", "--num_clusters", 3,
              "--save_folder", tmp_path / "clusters"),
             ("compute_avg_dist_to_cluster_centroid.py", "--sorted_clusters_path", sorted_dir,
              "--avg_distance_to_cent_save_path", tmp_path / "dintra.npy"),
             ("compute_centroid_distances.py", "--sorted_clusters_path", sorted_dir,
              "--mean_centroid_distances_save_path", tmp_path / "dinter.npy", "--num_NNs", 1),
             ("prune.py", "--sorted-clusters-path", sorted_dir, "--avg_distance_to_cent_save_path",
              tmp_path / "dintra.npy", "--mean_centroid_distances_save_path", tmp_path / "dinter.npy",
              "--prune-ratio", 0.5, "--save-dir", tmp_path / "run")]
    for name, *args in steps:
        r = script(name, *args, env=cluster)
        assert r.returncode == 0, r.stderr
    args = ["--prune-dir", tmp_path / "run", "--shards", data["pattern"], "--per-strip", 4, "--workers", 2]
    local = run("make_report.py", args, tmp_path / "report_local", "local", cluster)
    assert run("make_report.py", args, tmp_path / "report_ray", "ray", cluster) == local
    assert sum(name.parts[0] == "thumbs" for name in local) > 10


def test_a_killed_task_worker_is_run_again_to_the_same_output(cluster, data, dedup_local, tmp_path):
    marker = tmp_path / "paused"
    proc = start_script(DEDUP_SCRIPT, *dedup_args(data), "--distributor", "ray", "--save_folder", tmp_path / "run",
                        env={**cluster, "DBP_PAUSE_AT": f"task score_cluster {marker}"})
    wait_until(lambda: marker.exists() and marker.read_text(), proc, "a scoring task to stop itself")
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the task's worker, as the OOM killer would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert outputs(tmp_path / "run") == dedup_local


def test_an_input_a_node_cannot_see_is_one_line_naming_it_and_the_node(cluster, data, tmp_path):
    """A task that finds no file where the driver saw one (storage its node does not share): one line naming the
    file and the node, nothing published. The files go while the first scoring task is stopped."""
    import shutil
    import socket

    sorted_dir = tmp_path / "sorted_clusters"
    shutil.copytree(data["dedup"]["sorted"], sorted_dir)
    marker = tmp_path / "paused"
    proc = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", sorted_dir, "--embeddings", data["dedup"]["emb"],
                        "--eps", *EPS, "--distributor", "ray", "--save_folder", tmp_path / "run",
                        env={**cluster, "DBP_PAUSE_AT": f"task score_cluster {marker}"})
    wait_until(lambda: marker.exists() and marker.read_text(), proc, "a scoring task to stop itself")
    worker = int(marker.read_text())
    wait_until(lambda: process_state(worker) == "T", proc, "the task's worker stopped")  # (else it would miss SIGCONT)
    shutil.rmtree(sorted_dir)
    os.kill(worker, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {sorted_dir}{os.sep}cluster_") and \
        f".npy: is not visible on node {socket.gethostname()} (put the inputs and the output folder on storage " \
        "every node sees" in line, line
    assert not (tmp_path / "run").exists()


def test_a_ray_started_for_the_run_leaves_no_process_behind(data, tmp_path):
    before = ray_processes()  # (the module's cluster, when it is up)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = start_script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--niter", 2,
                        "--save_folder", tmp_path / "out", "--distributor", "ray", "--workers", 2, env=env,
                        pause="assign started")
    wait_paused(proc, "assign started")  # its Ray is up, its tasks running
    started = ray_processes() - before
    assert started
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "clustered 2400 rows" in out
    wait_until(lambda: not (ray_processes() & started), what="the Ray the run started to stop, all of it")


def test_without_ray_one_line_says_how_to_install_it(data, tmp_path):
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")  # as if not installed
    r = script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--save_folder", tmp_path / "out",
               "--distributor", "ray", env={**os.environ, "PYTHONPATH": str(tmp_path / "shadow")})
    assert r.returncode == 2
    assert "pip install 'density-based-pruning[ray]'" in error_line(r.stderr)
    assert not (tmp_path / "out").exists()


def nowhere(env: dict) -> dict:
    """RAY_ADDRESS at a port where no Ray listens (a wrong port, a head that died)."""
    return {**env, "RAY_ADDRESS": f"127.0.0.1:{free_port()}", "DBP_RAY_CONNECT_TIMEOUT": "5"}


def test_a_cluster_that_is_not_there_is_one_line_in_bounded_time(data, tmp_path):
    r = script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--save_folder", tmp_path / "out",
               "--distributor", "ray", env=nowhere(os.environ))
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert "--distributor: ray" in line and "RAY_ADDRESS=127.0.0.1:" in line and "DBP_RAY_CONNECT_TIMEOUT" in line
    assert not (tmp_path / "out").exists()


def test_an_address_ray_refuses_is_one_line_with_its_reason(data, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "localhost:notaport", "DBP_RAY_CONNECT_TIMEOUT": "600"}  # (not the deadline)
    r = script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--save_folder", tmp_path / "out",
               "--distributor", "ray", env=env)
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr).startswith("error: --distributor: ray cannot reach the cluster at "
                                           "RAY_ADDRESS=localhost:notaport (ValueError: "), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("timeout", ["soon", "0", "nan"])
def test_a_connect_timeout_that_is_no_number_of_seconds_is_one_line(data, tmp_path, timeout):
    r = script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--save_folder", tmp_path / "out",
               "--distributor", "ray", env={**nowhere(os.environ), "DBP_RAY_CONNECT_TIMEOUT": timeout})
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr).startswith(f"error: DBP_RAY_CONNECT_TIMEOUT: {timeout!r} is not a number of seconds "
                                           "above 0 (set it to the seconds to wait for Ray")
    assert not (tmp_path / "out").exists()


def test_sigterm_while_connecting_ends_the_run(data, tmp_path):
    env = {**nowhere(os.environ), "DBP_RAY_CONNECT_TIMEOUT": "600"}  # (only the signal can end it in time)
    proc = start_script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--save_folder",
                        tmp_path / "out", "--distributor", "ray", env=env, pause="ray connecting")
    wait_paused(proc, "ray connecting")
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated (SIGTERM)" in error_line(err)


@pytest.mark.parametrize("signum,said", [(signal.SIGTERM, "terminated (SIGTERM)"),
                                         (signal.SIGINT, "interrupted (Ctrl-C)")])
@pytest.mark.parametrize("own", [False, True])
def test_a_signal_while_running_on_ray_ends_the_run_in_one_line(cluster, data, tmp_path, signum, said, own):
    """SIGTERM (a scheduler's, timeout's) or Ctrl-C once the run is on Ray (a cluster it joined, or a Ray of its own,
    whose processes the signal reaches too, sent to the whole process group as a terminal sends it): one line,
    nothing else. Before, Ray's core had taken SIGTERM over as it connected (abseil's failure handler: a stack dump
    on stderr, and an abort armed for 3 s later, before it handed the signal on to the run)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} if own else cluster
    proc = start_script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--niter", 2,
                        "--save_folder", tmp_path / "out", "--distributor", "ray", "--workers", 2, env=env,
                        pause="assign started")
    wait_paused(proc, "assign started")  # connected, its tasks running
    (os.killpg if own else os.kill)(proc.pid, signum)
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and said in error_line(err), err
    assert not (tmp_path / "out" / "clustering.json").exists()


def without_fate_sharing(tmp_path, pause: str) -> dict:
    """The environment of a run that starts its own Ray as on macOS, where the kernel cannot end Ray's processes with
    the run (simulated: Ray told this Linux has none): ray.init starts a reaper and first makes the run lead a
    process group of its own."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "if sys.argv[0].endswith('cluster_embeddings.py'):  # the run alone: Ray's own processes as they are\n"
        "    import ray._private.utils\n"
        "    ray._private.utils.detect_fate_sharing_support = lambda: None  # as on macOS\n")
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(site),
            "DBP_PAUSE_AT": pause}


@contextlib.contextmanager
def started_by_a_script(data, tmp_path, env: dict):
    """The run as a line of a script: a member of the script's process group (here a `sleep` leads it), not its
    leader. Yields (the run, the group's leader)."""
    script_group = subprocess.Popen(["sleep", "600"], process_group=0)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, CLUSTER_SCRIPT), "--embeddings", data["img_emb"],
                             "--num_clusters", "4", "--niter", "2", "--save_folder", tmp_path / "out",
                             "--distributor", "ray", "--workers", "2"], env=env, process_group=script_group.pid,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, script_group
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # (its Ray's group, the reaper's)
        for process in (proc, script_group):
            process.kill()
            process.wait()


def test_a_ray_of_the_runs_own_leaves_the_run_in_the_terminals_process_group(data, tmp_path):
    """Where ray.init moves the run into a process group of its own (macOS, simulated), a run started by a script
    left the terminal's foreground group, and Ctrl-C at the terminal reached everything but the run, which went on.
    The run goes back into its group: Ctrl-C to the group ends it in one line."""
    with started_by_a_script(data, tmp_path, without_fate_sharing(tmp_path, "assign started")) as (proc, group):
        wait_paused(proc, "assign started")  # its Ray up, its tasks running
        assert os.getpgid(proc.pid) == group.pid
        os.killpg(group.pid, signal.SIGINT)  # Ctrl-C at the terminal
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "interrupted (Ctrl-C)" in error_line(err), err


def test_a_ray_of_the_runs_own_leaves_the_run_where_it_is_when_its_group_is_gone(data, tmp_path):
    """The same, but the script has ended while the run connected (the run was the group's last member): there is
    no group to go back to, and the run goes on where Ray put it."""
    with started_by_a_script(data, tmp_path, without_fate_sharing(tmp_path, "ray connecting")) as (proc, group):
        wait_paused(proc, "ray connecting")
        group.kill()
        group.wait()
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "clustered 2400 rows" in out, err


def test_a_refused_token_is_named(cluster, data, tmp_path):
    r = script(CLUSTER_SCRIPT, "--embeddings", data["img_emb"], "--num_clusters", 4, "--save_folder", tmp_path / "out",
               "--distributor", "ray", env={**cluster, "RAY_AUTH_TOKEN": "not-the-token-" + "0" * 32})
    assert r.returncode == 2, r.stderr
    assert "refused this run's authentication token" in error_line(r.stderr) and "RAY_AUTH_TOKEN" in r.stderr


def test_gpu_tasks_are_scheduled_on_a_gpu_and_a_node_without_cuda_says_so(cluster, data, tmp_path):
    args = ["--shards", data["pattern"], "--model", data["model"], "--device", "cuda", "--distributor", "ray"]
    r = script(EMBED_SCRIPT, *args, "--output_folder", tmp_path / "out", env=cluster)
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert "Ray gave this task GPU" in line and "torch there sees no CUDA device" in line  # num_gpus=1: it got one
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of the run's own: no GPU
    r = script(EMBED_SCRIPT, *args, "--output_folder", tmp_path / "out2", "--workers", 2, env=env)
    assert r.returncode == 2 and "the Ray cluster has no GPU" in error_line(r.stderr), r.stderr
