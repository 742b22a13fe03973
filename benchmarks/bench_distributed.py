"""Benchmark --distributor ray against local on one machine: the whole run, and the cost of a task.

Measures in one run:
  - cluster_embeddings.py on bench_cluster.py's embeddings (2M x 64 float16 by default), with
    --distributor local, with --distributor ray on a Ray the run starts for itself (its start-up and
    shut-down counted) and joining a Ray already running (`ray start --head`, RAY_ADDRESS=auto), and that
    all three write the same bytes;
  - the cost of one task: many empty tasks through tasks.TaskPool, local and on Ray (Ray's start-up
    not counted there), per task.

    python benchmarks/bench_distributed.py --rows 2000000 --dim 64 --clusters 500
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from bench_cluster import generate  # noqa: E402
from bench_pipeline import compare_outputs, machine, measure, warm_cache  # noqa: E402

EMPTY_TASKS = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
count, distributor = int(sys.argv[2]), sys.argv[3]
with tasks.TaskPool(2, distributor) as pool:
    list(pool.run(abs, [1, 2], "warm up"))  # the workers (and Ray) started and ready
    start = time.perf_counter()
    list(pool.run(abs, list(range(count)), "empty tasks"))
    print(json.dumps({"per_task_ms": (time.perf_counter() - start) / count * 1000}))
"""


def start_cluster(ray: str, cpus: int) -> int:
    """`ray start --head` on free ports (never Ray's defaults: a Ray of the user's may run here), in a session of its
    own, which every process of the cluster stays in: the session's id, to stop it by."""
    import socket

    ports = []
    for _ in range(7):
        with socket.socket() as s:
            s.bind(("", 0))
            ports.append(str(s.getsockname()[1]))
    flags = ("--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
    start = subprocess.Popen([ray, "start", "--head", "--num-cpus", str(cpus), "--disable-usage-stats",
                              "--include-dashboard=false", *(a for pair in zip(flags, ports) for a in pair)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, said = start.communicate()
    if start.returncode != 0:
        sys.exit(f"ray start failed: {said}")
    return start.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--niter", type=int, default=20, help="k-means iterations (default: 20)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, the best counted (default: 2)")
    parser.add_argument("--tasks", type=int, default=500, help="empty tasks for the per-task cost (default: 500)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"))
    args = parser.parse_args()

    print(machine())
    data = os.path.join(args.data, f"emb_{args.rows}_{args.dim}")
    generate(data, args.rows, args.dim, 0)
    warm_cache(data)
    work = tempfile.mkdtemp(prefix="dbp_bench_distributed_")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # ray: a Ray of the run's own
    best = {}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    for _ in range(args.repeat):  # the three interleaved, so that the machine's drift hits them alike
        for name in ("local", "ray", "joined"):
            out = f"{work}/{name}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, os.path.join(ROOT, "cluster_embeddings.py"), "--embeddings", f"{data}/emb.npy",
                   "--keys", f"{data}/keys.txt", "--num_clusters", str(args.clusters), "--niter", str(args.niter),
                   "--save_folder", out, "--workers", str(args.workers),
                   "--distributor", "local" if name == "local" else "ray"]
            os.environ.pop("RAY_ADDRESS", None)  # (measure runs it in this environment)
            if name == "joined":  # a cluster that is already up, as `ray start --head` leaves one
                session = start_cluster(ray, args.workers)
                os.environ["RAY_ADDRESS"] = "auto"
            try:
                wall = measure(cmd)["wall_s"]
            finally:
                if name == "joined":
                    os.environ.pop("RAY_ADDRESS")
                    subprocess.run(["pkill", "-KILL", "-s", str(session)])  # (not `ray stop`: every Ray here)
            best[name] = min(wall, best.get(name, wall))
    print(f"data: {args.rows:,} x {args.dim} float16, k = {args.clusters}, niter {args.niter}, "
          f"--workers {args.workers}\n")
    local = best["local"]
    print(f"cluster_embeddings.py --distributor local   {local:7.2f} s   (best of {args.repeat}, as below)")
    for name, how in (("ray", "a Ray started and stopped by the run"), ("joined", "joining a running Ray")):
        print(f"cluster_embeddings.py --distributor ray     {best[name]:7.2f} s   "
              f"({best[name] / local:.2f}x local, {how}); the same bytes: "
              f"{compare_outputs(f'{work}/local', f'{work}/{name}')}")
    for distributor in ("local", "ray"):
        r = subprocess.run([sys.executable, "-c", EMPTY_TASKS, ROOT, str(args.tasks), distributor],
                           capture_output=True, text=True, env=env)
        cost = json.loads(r.stdout.strip().splitlines()[-1])["per_task_ms"] if r.returncode == 0 else float("nan")
        print(f"one empty task, {distributor:5s}: {cost:.2f} ms")


if __name__ == "__main__":
    main()
