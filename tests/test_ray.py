"""--distributor ray, on a real local Ray: the same bytes as a local run, a killed task worker retried, no Ray
process left behind by a run that started its own, and the line that says how to install Ray."""

import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import CLUSTER_SCRIPT, ROOT, error_line, outputs, start_script, wait_paused, wait_until
from test_dedup import DEDUP_SCRIPT, EPS, make_data
from test_embed import EMBED_SCRIPT, make_toy_images

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray cluster on this machine, as `ray start --head` makes one (token authentication left on), joined
    with RAY_ADDRESS=auto."""
    r = subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--disable-usage-stats",
                        "--include-dashboard=false"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    yield {**os.environ, "RAY_ADDRESS": "auto"}
    subprocess.run([RAY, "stop", "--force"], capture_output=True)


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


def script(name, *args, env):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], capture_output=True, text=True,
                          env=env)


def run(name, args, out, distributor, env):
    """One command with --distributor local or ray; its outputs."""
    r = script(name, *args, "--save_folder" if name != EMBED_SCRIPT else "--output_folder", out,
               "--distributor", distributor, env=env)
    assert r.returncode == 0, r.stderr
    return outputs(out)


def dedup_args(data):
    return ["--sorted_clusters_path", data["dedup"]["sorted"], "--embeddings", data["dedup"]["emb"], "--eps", *EPS]


@pytest.fixture(scope="module")
def dedup_local(data, tmp_path_factory):
    """deduplicate.py's outputs from the local process pool: what every Ray run must reproduce."""
    return run(DEDUP_SCRIPT, dedup_args(data), tmp_path_factory.mktemp("dedup") / "local", "local", os.environ)


def test_the_same_bytes_as_a_local_run(cluster, data, dedup_local, tmp_path):
    args = ["--embeddings", data["img_emb"], "--num_clusters", 12, "--niter", 5]
    local = run(CLUSTER_SCRIPT, args, tmp_path / "cluster_local", "local", cluster)
    assert run(CLUSTER_SCRIPT, args, tmp_path / "cluster_ray", "ray", cluster) == local and len(local) == 14
    assert run(DEDUP_SCRIPT, dedup_args(data), tmp_path / "dedup", "ray", cluster) == dedup_local
    args = ["--shards", data["pattern"], "--model", data["model"], "--batch-size", 8]
    local = run(EMBED_SCRIPT, args, tmp_path / "embed_local", "local", cluster)
    assert run(EMBED_SCRIPT, args, tmp_path / "embed_ray", "ray", cluster) == local
    assert sum(name.parts[0] == "img_emb" for name in local) == 2


def test_a_killed_task_worker_is_run_again_to_the_same_output(cluster, data, dedup_local, tmp_path):
    marker = tmp_path / "paused"
    proc = start_script(DEDUP_SCRIPT, *dedup_args(data), "--distributor", "ray", "--save_folder", tmp_path / "run",
                        env={**cluster, "DBP_PAUSE_AT": f"task score_cluster {marker}"})
    wait_until(lambda: marker.exists() and marker.read_text(), proc, "a scoring task to stop itself")
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the task's worker, as the OOM killer would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert outputs(tmp_path / "run") == dedup_local


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
