"""The plumbing: tasks keep their order and pass errors on, and a failed bar ends its line."""

import contextlib
import multiprocessing
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import filelock
import pytest
from conftest import DEADLINE, ROOT, descendants, process_state, wait_until

from dbpkit import cli, errors, local_engine, tasks


def square_or_fail(x):
    if x == 13:
        raise errors.UsageError("item 13", "is unlucky", "skip it")
    return x * x, os.getpid()


def test_a_long_call_is_stoppable_while_it_runs_and_gives_its_result_or_error(monkeypatch):
    """stoppable: the caller's thread is a safe point while the call runs in another (a recorded SIGTERM stops it
    before the call ends: here the call waits for an event set only afterwards); without a signal, the call's
    result, or its exception."""
    import threading

    assert cli.stoppable(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        cli.stoppable(divmod, 1, 0)
    release, finished = threading.Event(), []
    monkeypatch.setattr(cli, "_signals", [signal.SIGTERM])
    with pytest.raises(errors.Terminated):
        cli.stoppable(lambda: finished.append(release.wait(DEADLINE)))
    assert finished == []  # (stopped while the call still ran)
    release.set()


def test_k_means_training_is_stoppable(monkeypatch):
    """faiss's k-means (hours at SemDeDup's k) trains in a thread while the run stays a safe point; the same
    centroids as before it did."""
    import faiss
    import numpy as np

    from dbpkit.kmeans import exact_faiss, fit

    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    centroids, objective = fit(x, 10, 5, 1, False, 2)
    exact_faiss(2)  # (in this thread: faiss as fit sets it up, on 2 threads)
    direct = faiss.Kmeans(8, 10, niter=5, seed=1, verbose=False, max_points_per_centroid=300,
                          min_points_per_centroid=1)
    direct.train(x)
    assert centroids.tobytes() == direct.centroids.tobytes() and objective == pytest.approx(direct.obj[-1])
    monkeypatch.setattr(cli, "_signals", [signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        fit(x, 10, 5, 1, False, 2)


def test_the_training_sample_is_read_stoppably(tmp_path, monkeypatch):
    """The training sample (millions of rows read all over LAION's embeddings) is read while the run stays a safe
    point: the rows asked for, then a recorded SIGTERM stops the read."""
    import numpy as np

    from dbpkit import kmeans, layouts

    x = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    embeddings = layouts.find_embeddings(str(tmp_path / "emb.npy"), None, None, "l14_img", with_keys=False)
    rows = np.sort(np.random.default_rng(3).choice(500, size=50, replace=False))
    expected = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
    np.testing.assert_allclose(kmeans.training_sample(embeddings, 3, 50), expected, rtol=1e-6)
    monkeypatch.setattr(cli, "_signals", [signal.SIGTERM])
    with pytest.raises(errors.Terminated):
        kmeans.training_sample(embeddings, 3, 50)


def test_pool_results_come_in_order_from_several_workers():
    with tasks.TaskPool(3) as pool:
        results = list(pool.run(square_or_fail, list(range(12)), "squares"))
    assert [r for r, _ in results] == [x * x for x in range(12)]
    assert os.getpid() not in {pid for _, pid in results}


def test_a_bars_rate_and_time_left_count_from_when_the_workers_are_running(monkeypatch):
    """Not from the bar's creation: the workers' start-up (a fork server importing torch, a second or more) would
    make the first estimate of a long run far too long. tqdm's own clock, read back from the bar."""
    bars, reached = [], {}
    real_progress, real_stage = tasks.progress, tasks.stage

    @contextlib.contextmanager
    def kept(*args, **kwargs):
        with real_progress(*args, **kwargs) as bar:
            bars.append((bar, bar.start_t))
            yield bar

    def noted(name: str) -> None:
        reached.setdefault(name, time.time())
        real_stage(name)

    monkeypatch.setattr(tasks, "progress", kept)
    monkeypatch.setattr(tasks, "stage", noted)
    with tasks.TaskPool(2) as pool:
        assert len(list(pool.run(square_or_fail, list(range(6)), "squares"))) == 6
    [(bar, created)] = bars
    assert created < reached["squares started"] <= bar.start_t <= reached["squares under way"]


def test_a_workers_error_reaches_the_caller_and_stops_the_pool():
    with pytest.raises(errors.UsageError, match="item 13: is unlucky"):
        with tasks.TaskPool(2) as pool:
            list(pool.run(square_or_fail, list(range(40)), "squares"))
    assert multiprocessing.active_children() == []  # stopped and reaped, not left to finish


def test_many_light_tasks_go_out_in_batches_and_still_come_back_in_order_with_their_errors():
    with tasks.TaskPool(2) as pool:
        results = list(pool.run(square_or_fail, [x for x in range(2000) if x != 13], "squares"))
    assert [r for r, _ in results] == [x * x for x in range(2000) if x != 13]
    assert os.getpid() not in {pid for _, pid in results}  # run by the workers
    with pytest.raises(errors.UsageError, match="item 13: is unlucky"):  # deep inside a batch
        with tasks.TaskPool(2) as pool:
            list(pool.run(square_or_fail, list(range(2000)), "squares"))


def test_batches_are_drawn_from_the_tasks_only_as_they_are_needed():
    drawn = []

    def lazily():
        for x in range(10):
            drawn.append(x)
            yield x
    batches = tasks._batches(lazily(), 4)
    assert next(batches) == [0, 1, 2, 3] and drawn == [0, 1, 2, 3]
    assert list(batches) == [[4, 5, 6, 7], [8, 9]]


def announce_then_hang(task):
    """Task 0 returns once the others have started; the others say so (a file named for their worker) and
    never end."""
    folder, number = task
    if number == 0:
        deadline = time.monotonic() + 60
        while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.listdir(folder)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(3600)


def test_a_failed_run_kills_its_workers_mid_task_and_no_other_child(tmp_path):
    """The run fails while two workers are busy with tasks that never end: its workers are killed (the run
    does not wait for them); a child process the caller started before the pool (multiprocessing's, like
    the workers) is left alone."""
    own = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
    own.start()
    try:
        with pytest.raises(RuntimeError, match="the caller failed"):
            with tasks.TaskPool(3) as pool:
                for started in pool.run(announce_then_hang, [(str(tmp_path), n) for n in range(3)], "hanging"):
                    assert len(started) == 2, "the two hanging tasks started"
                    raise RuntimeError("the caller failed")
        assert multiprocessing.active_children() == [own]
    finally:
        own.kill()
        own.join()
    for pid in [int(name) for name in os.listdir(tmp_path)]:  # killed, and reaped by the pool's shutdown
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_leading_its_own_group_still_writes_to_the_terminal_under_tostop():
    """A worker that leads a process group of its own (lead_own_group: so that the run can end it with the commands
    it started) is out of the terminal's foreground group: with `stty tostop` its write to the terminal would stop
    it (SIGTTOU), and the run wait for it. In a pseudo-terminal with tostop set, a child that leads its own group
    writes a line and ends; one that only leaves the group (setpgid, as before) is stopped."""
    for lead, expected in ((local_engine.lead_own_group, b"written\r\nended\r\n"), (lambda: os.setpgid(0, 0),
                                                                                    b"stopped\r\n")):
        pid, terminal = pty.fork()
        if pid == 0:  # a session of its own, the pseudo-terminal its controlling terminal, it in the foreground
            try:
                attributes = termios.tcgetattr(1)
                attributes[3] |= termios.TOSTOP
                termios.tcsetattr(1, termios.TCSANOW, attributes)
                worker = os.fork()
                if worker == 0:
                    try:
                        lead()
                        os.write(1, b"written\n")
                    finally:
                        os._exit(0)
                _, status = os.waitpid(worker, os.WUNTRACED)
                os.write(1, b"stopped\n" if os.WIFSTOPPED(status) else b"ended\n")
                if os.WIFSTOPPED(status):
                    os.kill(worker, signal.SIGKILL)
            finally:
                os._exit(0)
        said, chunk = b"", b"-"
        while chunk:
            assert select.select([terminal], [], [], DEADLINE)[0], f"nothing for {DEADLINE} s after {said!r}: a hang"
            try:
                chunk = os.read(terminal, 1024)
            except OSError:  # (EIO once the terminal's last holder has closed it, on Linux)
                chunk = b""
            said += chunk
        os.close(terminal)
        os.waitpid(pid, 0)
        assert said == expected


def sized(n: int) -> bytes:
    if n == 13:
        raise errors.UsageError("item 13", "is unlucky", "skip it")
    return (b"0123456789" * (n // 10 + 1))[:n]


def test_results_of_any_size_come_back_whole_and_leave_no_file_behind():
    """Results past what a pipe takes at once come back through files of the pool's folder: each read once and
    removed, the folder removed with the pool, also when the run fails."""
    sizes = [0, 10, local_engine.IN_PIPE_BYTES, local_engine.IN_PIPE_BYTES + 1, 3_000_000, 7]
    with tasks.TaskPool(2) as pool:
        assert list(pool.run(sized, sizes, "sizes")) == [sized(n) for n in sizes]
        folder = pool.engine.folder
        assert os.listdir(folder) == []
    assert not os.path.exists(folder)
    pool = tasks.TaskPool(2)
    with pytest.raises(errors.UsageError, match="item 13"):
        with pool:
            list(pool.run(sized, [3_000_000, 13, 3_000_000], "sizes"))
    assert not os.path.exists(pool.engine.folder)


RUN_OF_SMALL_RESULTS = """
import sys
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
with tasks.TaskPool(2) as pool:
    print(sum(pool.run(len, ["ab", "cde"], "lengths")), flush=True)
    sys.stdin.read()  # (killed here, with its workers)
"""


def test_a_run_killed_with_its_workers_leaves_no_results_folder(tmp_path):
    """kill -9 of the whole process group (nothing of the run cleans up): the pool's folder in the temp dir is made
    only for a result too large for the pipe, so a run that had none leaves nothing there."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.Popen([sys.executable, "-c", RUN_OF_SMALL_RESULTS, ROOT], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert run.stdout.readline() == "5\n"
        assert descendants(run.pid)  # (its fork server and workers, killed with it)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=DEADLINE)
        assert [name for name in os.listdir(tmp_path) if name.startswith("dbp_results_")] == []
    finally:
        run.kill()
        run.wait()


LARGE_RESULT = """
import os, time
FOLDER = os.environ["DBP_TEST_FOLDER"]


def large_once_let_go(number):
    if number == 0:
        return "small"
    open(os.path.join(FOLDER, "started"), "w").close()  # in a worker: the run's process may stop now
    while not os.path.exists(os.path.join(FOLDER, "go")):  # (the test stops the run's process first)
        time.sleep(0.01)
    result = b"x" * 4_000_000  # ~60 times what a pipe holds
    with open(os.path.join(FOLDER, "returning"), "w") as f:
        f.write(str(os.getpid()))
    if os.environ["DBP_TEST_RAISE"]:  # an exception as large, raised at the same point
        raise ValueError(result)
    return result
"""
RUN_LARGE_RESULT = """
import sys
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
from large_result import large_once_let_go
try:
    with tasks.TaskPool(2) as pool:
        for n, result in enumerate(pool.run(large_once_let_go, [0, 1], "handing back")):
            print(n, len(result), flush=True)
except ValueError as e:
    print("raised", len(e.args[0]), type(e.__cause__).__name__, "large_once_let_go" in str(e.__cause__))
"""


def start_large_result(tmp_path, script: str, raised: bool = False) -> subprocess.Popen:
    """A run of `script`, whose second task (large_once_let_go) waits for hand_back_while_stopped."""
    (tmp_path / "large_result.py").write_text(LARGE_RESULT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DBP_TEST_FOLDER": str(tmp_path),
           "DBP_TEST_RAISE": "1" if raised else ""}
    return subprocess.Popen([sys.executable, "-c", script, ROOT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def hand_back_while_stopped(tmp_path, run: subprocess.Popen) -> int:
    """Stop the run's process once the large task has started in a worker, then let the task return: the worker's
    pid, once it is blocked handing its result back or done and waiting for more."""
    wait_until(lambda: (tmp_path / "started").exists(), run, "the large result's task")
    os.kill(run.pid, signal.SIGSTOP)  # (it takes no result from now on)
    (tmp_path / "go").touch()
    wait_until(lambda: (tmp_path / "returning").exists() and (tmp_path / "returning").read_text())
    worker = int((tmp_path / "returning").read_text())
    wait_until(lambda: process_state(worker) == "S")
    return worker


@pytest.mark.parametrize("raised", [False, True])
def test_a_worker_killed_after_handing_back_a_large_result_hangs_nothing(tmp_path, raised):
    """A worker hands back a result (or an exception) of 4 MB while the run's process is stopped (nothing reads
    the pipe), then is killed: the run still gets the whole of it and ends (half of it in the pipe, the
    executor's reader would wait for the rest without end). The exception comes with the worker's traceback."""
    run = start_large_result(tmp_path, RUN_LARGE_RESULT, raised)
    try:
        assert run.stdout.readline() == "0 5\n"
        worker = hand_back_while_stopped(tmp_path, run)
        os.kill(worker, signal.SIGKILL)
        os.kill(run.pid, signal.SIGCONT)
        out, err = run.communicate(timeout=DEADLINE)
        assert run.returncode == 0, err
        assert out == ("raised 4000000 WorkerTraceback True\n" if raised else "1 4000000\n")
    finally:
        run.kill()
        run.wait()


RUN_KILLED = """
import sys
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
from large_result import large_once_let_go
with tasks.TaskPool(2) as pool:
    for result in pool.run(large_once_let_go, [0, 1], "handing back"):
        print(pool.engine.folder, flush=True)
"""


def test_a_killed_runs_results_folder_goes_with_its_workers(tmp_path):
    """The run is killed (SIGKILL: nothing of it runs) while a result of 4 MB waits in the pool's folder for it:
    its workers, ending with it, remove the folder."""
    run = start_large_result(tmp_path, RUN_KILLED)
    try:
        folder = run.stdout.readline().strip()  # (made when the large result comes)
        worker = hand_back_while_stopped(tmp_path, run)
        workers = descendants(run.pid)
        # handed back, waiting for more
        wait_until(lambda: os.path.isdir(folder) and os.listdir(folder) and process_state(worker) == "S")
        os.kill(run.pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(folder), what="the results folder removed")
        wait_until(lambda: not any(process_state(pid) not in (None, "Z") for pid in workers), what="the workers' end")
    finally:
        run.kill()
        run.wait()


def test_a_failed_bar_ends_its_line_in_a_log_file(monkeypatch, capsys):
    """stderr to a file: what is printed after a failure (the error line) starts on a line of its own."""
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0)
    with pytest.raises(errors.UsageError):
        list(tasks.TaskPool(1).run(square_or_fail, list(range(20)), "squares"))
    err = capsys.readouterr().err
    assert "squares:" in err and err.endswith("\n")


FORK_SERVER_END = """
import atexit, os, sys
sys.path.insert(0, sys.argv[1])
atexit.register(print, "teardown ran")  # registered first: runs last, unless the interpreter ends before it
from dbpkit import local_engine
print("variable left:", local_engine.FORK_SERVER_VARIABLE in os.environ)
"""


@pytest.mark.parametrize("value, teardown", [("parent", False), ("other", True), (None, True)])
def test_the_fork_server_alone_ends_without_the_interpreters_teardown(value, teardown):
    """Imported in the fork server (the variable naming the run that started it), dbpkit.local_engine makes its end
    skip the teardown (torch's takes 0.3 s); anywhere else, nothing changes. The variable is not passed on."""
    env = {k: v for k, v in os.environ.items() if k != local_engine.FORK_SERVER_VARIABLE}
    if value is not None:
        env[local_engine.FORK_SERVER_VARIABLE] = str(os.getpid()) if value == "parent" else "1"
    r = subprocess.run([sys.executable, "-c", FORK_SERVER_END, ROOT], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["variable left: False"] + (["teardown ran"] if teardown else [])


PREPARE = """
import multiprocessing.forkserver, sys
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
workers, distributor = int(sys.argv[2]), sys.argv[3]
tasks.TaskPool(workers, distributor).prepare()
pid = multiprocessing.forkserver._forkserver._forkserver_pid
print("fork server:", pid is not None)
if pid is not None:  # the pools of the run come from it, not from another
    with tasks.TaskPool(workers) as pool:
        print("results:", list(pool.run(abs, [-1, -2, -3], "probe")))
    print("the same one:", multiprocessing.forkserver._forkserver._forkserver_pid == pid)
"""


@pytest.mark.parametrize("workers, distributor, started", [(2, "local", True), (1, "local", False), (2, "ray", False)])
def test_prepare_starts_the_local_workers_fork_server_before_any_pool_runs(workers, distributor, started):
    """deduplicate.py starts its workers' fork server (torch's import, a second or more) before it checks its
    inputs; with one worker there is none to start, and on Ray connecting waits for start()."""
    r = subprocess.run([sys.executable, "-c", PREPARE, ROOT, str(workers), distributor], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == (["fork server: True", "results: [1, 2, 3]", "the same one: True"] if started
                                     else ["fork server: False"])


WHOSE = """
def dbpkit_file(_):
    import dbpkit
    return dbpkit.__file__
"""
RUN_WHOSE = """
import sys
sys.path[:0] = sys.argv[1:3]  # this checkout, then the folder of the task's module
import dbpkit
from dbpkit import tasks
from whose import dbpkit_file
with tasks.TaskPool(2, sys.argv[3]) as pool:
    print(*sorted(set(pool.run(dbpkit_file, range(4), "whose"))), dbpkit.__file__)
"""
DECOY = """
import pathlib
pathlib.Path(__file__).with_name("imported").touch()
"""


@pytest.mark.parametrize("where, distributor", [("the current folder", "local"), ("PYTHONPATH", "local"),
                                                ("PYTHONPATH", "ray")])
def test_the_workers_import_the_runs_own_checkout_not_another_in_the_current_folder_or_on_pythonpath(
        tmp_path, where, distributor):
    """A researcher runs one checkout's script from inside another (or with another on PYTHONPATH): the workers'
    fork server, which Python 3.11 starts with the current folder first on its path and PYTHONPATH before this
    project's folder, imported the other checkout's dbpkit, whose code the workers then ran (or died on); so did
    the workers of a Ray started for the run, whose path had PYTHONPATH before this project's folder."""
    other = tmp_path / "other_checkout"
    (other / "dbpkit").mkdir(parents=True)
    (other / "dbpkit" / "__init__.py").write_text(DECOY)  # marks itself imported
    (tmp_path / "whose.py").write_text(WHOSE)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # (on Ray: one of the run's own)
           **({"PYTHONPATH": str(other)} if where == "PYTHONPATH" else {})}
    r = subprocess.run([sys.executable, "-c", RUN_WHOSE, ROOT, str(tmp_path), distributor],
                       cwd=other if where != "PYTHONPATH"
                       else tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    ours = os.path.join(ROOT, "dbpkit", "__init__.py")
    assert r.stdout.split() == [ours, ours]  # the workers' and the run's, one and the same
    assert not (other / "dbpkit" / "imported").exists()


BUSY_IMPORT = """
import fcntl, os
held = open(os.environ["DBP_TEST_LOCK"], "w")
fcntl.flock(held, fcntl.LOCK_EX)  # until this process ends
open(os.environ["DBP_TEST_LOCK"] + ".importing", "w").close()
while True:  # an import that never ends (torch's takes a second or more of a core)
    pass
"""
RUN_ENDING_EARLY = """
import multiprocessing.forkserver, sys
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
tasks.TaskPool(2, preload=("busy_import",)).prepare()
print(multiprocessing.forkserver._forkserver._forkserver_pid, flush=True)
sys.stdin.read()  # until the test has seen the fork server's imports under way, then a bad input, say
sys.exit(2)
"""


def test_a_run_that_ends_during_the_fork_servers_imports_ends_them(tmp_path):
    """deduplicate.py starts its workers' fork server before it checks its inputs: a run that stops at a bad input
    a moment later ends the fork server with it, rather than leaving it to finish importing torch for nothing."""
    (tmp_path / "busy_import.py").write_text(BUSY_IMPORT)
    lock = tmp_path / "server.lock"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DBP_TEST_LOCK": str(lock)}
    run = subprocess.Popen([sys.executable, "-c", RUN_ENDING_EARLY, ROOT], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    server = int(run.stdout.readline())
    try:
        wait_until(lambda: os.path.exists(f"{lock}.importing"), run, "the fork server's imports")
        run.stdin.close()
        assert run.wait(timeout=60) == 2
        filelock.FileLock(lock).acquire(timeout=60)  # free once the fork server has ended
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
        run.stdout.close()


FORKED_CHILD_EXITS = """
import multiprocessing.forkserver, os, signal, sys
sys.path.insert(0, sys.argv[1])
from dbpkit import tasks
tasks.TaskPool(2).prepare()
run, server = os.getpid(), multiprocessing.forkserver._forkserver._forkserver_pid


def recorded(pid, signum):
    print("kill", "the fork server" if pid == server else pid, signal.Signals(signum).name, "from",
          "the run" if os.getpid() == run else "a child", flush=True)


os.kill = recorded
child = os.fork()
if child == 0:
    sys.exit(0)  # its exit handlers run, those it inherited from the run included
os.waitpid(child, 0)
print("child exited", flush=True)
"""


def test_the_fork_server_is_ended_by_the_run_that_started_it_not_by_a_child_forked_from_it():
    r = subprocess.run([sys.executable, "-c", FORKED_CHILD_EXITS, ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["child exited", "kill the fork server SIGTERM from the run"]
