"""Shared fixtures: SemDeDup-style data sets from real faiss k-means, a script runner, faults at named stages."""

import contextlib
import ctypes
import os
import signal
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
           "temperature_sweep.csv", "params.json", "quotas.png", "logs.log"]


# The longest files first: each starts on a worker of its own, and no worker is left alone with one at the end.
SLOW_FILES = ("test_ray.py", "test_embed.py", "test_dedup.py", "test_report.py")


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: item.path.name not in SLOW_FILES)  # (a stable sort: the rest keep their order)


def run_script(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run one of the scripts as a user would, capturing its output."""
    args = [str(a) for a in args]
    if "--workers" not in args:
        args += ["--workers", "2"]
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, cwd=cwd)


def write_npz_as(path) -> None:
    """An .npz (a zip of arrays) written under a .npy's name, as np.savez into an open file writes it."""
    with open(path, "wb") as f:
        np.savez(f, rows=np.array([["a.jpg", "0", "0.5", "1"]]))


def outputs(folder) -> dict:
    """{file: bytes} of a run's outputs, but for its log and params (the command line, the times)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name not in ("logs.log", "params.json")}


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


# Faults at named stages: a run started with DBP_PAUSE_AT=<stage> stops itself (SIGSTOP) when it reaches the
# stage; the test waits for that event, delivers its fault, and lets the run go on (SIGCONT). No timing.
DEADLINE = 120  # seconds a run may take to reach its stage or end after a fault: only ever hit when it hangs
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # as --workers counts


def start_script(script: str, *args, pause: str | None = None, env: dict | None = None, **popen) -> subprocess.Popen:
    """A script in a session of its own (a signal can go to its whole process group), pausing at `pause`."""
    environ = {**os.environ, **(env or {})}
    if pause:
        environ["DBP_PAUSE_AT"] = pause
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(cmd, env=environ, start_new_session=True, **popen)


def finished(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a run in a session of its own (start_script) once it ends, within DEADLINE (else the test
    fails on the timeout: a hang); whatever is left of its session is killed either way."""
    try:
        return proc.communicate(timeout=DEADLINE)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, T for stopped, Z...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def wait_until(condition, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll for an event; fail if `proc` ends first or DEADLINE passes (a hang)."""
    import time

    deadline = time.monotonic() + DEADLINE
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"nothing happened for {DEADLINE} s while waiting for {what}: a hang")
        time.sleep(0.005)


def wait_paused(proc: subprocess.Popen, stage: str) -> None:
    wait_until(lambda: process_state(proc.pid) == "T", proc, f"the stage {stage!r}")


def signal_main_thread(pid: int, signum: int) -> None:
    """`signum` to the main thread of process `pid` (Linux's tgkill), paused at a stage: its handler runs as the run
    goes on, before the stage's safe point. Sent to the process, any of its threads may take it (the executor's, a
    progress bar's), a moment later, and the run stops only at its next safe point: after whatever it prints
    before that one (deduplicate.py's report prints a warning)."""
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, pid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid}")


def descendants(pid: int) -> list[int]:
    """Every live process below pid (the fork server and the workers it forked)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task") if os.path.exists(f"/proc/{parent}/task") else []:
            with contextlib.suppress(FileNotFoundError):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                found += kids
                todo += kids
    return found


def workers_of(pid: int) -> list[int]:
    """The worker processes of a run: forked by its fork server, so grandchildren of the run."""
    children = set(descendants(pid))
    direct = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                direct |= {int(c) for c in f.read().split()}
    return sorted(children - direct)


# How a run is stopped, by name: how the signal is sent to it (to the run, or to its process group as a terminal
# sends Ctrl-C), the signal, the exit status it then has and what its one line says (kill -9: none).
STOPS = {"ctrl-c": (os.killpg, signal.SIGINT, 130, "interrupted (Ctrl-C)"),
         "sigterm": (os.kill, signal.SIGTERM, 143, "terminated (SIGTERM)"),
         "kill -9": (os.kill, signal.SIGKILL, -9, None)}


@contextlib.contextmanager
def stalled_stream(folder):
    """A shard that stalls, as a download that hangs: `pipe:cat FIFO` of a FIFO no one writes to. Yields the
    --shards value and `read_by(proc)`, which returns once the run's cat has the FIFO open (it then waits for bytes
    that never come). At the end the writing end is closed: a cat still there ends."""
    fifo = folder / "stalled"
    os.mkfifo(fifo)
    held = []

    def opened() -> bool:
        try:
            held.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # (ENXIO: no reader yet)
            return False
        return True
    try:
        yield f"pipe:cat {fifo}", lambda proc: wait_until(opened, proc, "the stalled command to be read")
    finally:
        for fd in held:
            os.close(fd)


def session_is_empty(sid: int) -> bool:
    """No process is left in the run's session (its workers, fork server and resource tracker end with it)."""
    return subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).stdout == b""


@pytest.fixture
def small_disk(tmp_path):
    """A file system of its own, 80 KB (a tmpfs, mounted as root): a disk that really fills, where a write through a
    memory mapping is a SIGBUS rather than an error. Skipped where no tmpfs can be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80k", "tmpfs", disk], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"no tmpfs can be mounted here ({mounted.stderr.strip()})")
    yield disk
    subprocess.run(["umount", disk], check=True)


def limit_file_size(limit: int):
    """preexec_fn: files may not grow past `limit` bytes, as on a full disk (writes fail, nothing is killed)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def error_line(stderr: str) -> str:
    """The one error line a failed run ends with. Before it may stand only the progress bars of the work done
    up to the failure (drawn once the work has taken half a second: on a busy machine, even a quick error's)."""
    import re

    *bars, line = stderr.strip().splitlines() or [""]
    assert all(re.match(r"\r?[\w ]+: +(\d+%\||\d+\w+ \[)", bar) for bar in bars), stderr  # (with a total or not)
    assert line.startswith("error: ") and "Traceback" not in stderr, stderr
    return line


def drawn(figure):
    """The figure drawn as savefig draws it, and its renderer: what its artists' places are read back from."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    return renderer


def under_legend(ax, points) -> list:
    """The points (data coordinates of ax) that ax's legend covers in the drawn figure."""
    box = ax.get_legend().get_window_extent(drawn(ax.figure))
    return [tuple(p) for p, (x, y) in zip(points, ax.transData.transform(points))
            if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1]


def bar_tops(edges, heights, log_x: bool = True) -> list:
    """The left end, middle and right end of the top of each bar of height > 0 between `edges`."""
    return [(x, h) for a, b, h in zip(edges[:-1], edges[1:], heights) if h > 0
            for x in (a, np.sqrt(a * b) if log_x else (a + b) / 2, b)]
