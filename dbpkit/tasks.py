"""Tasks: units of work that read their inputs from files, write their outputs into the run's folder and
return small metadata, run in worker processes on this machine or as Ray tasks on a cluster (ray_engine).

One task model for both distributors. A task must be safe to run twice (Ray runs a task again when its
worker dies): it writes its outputs whole, under names of its own. `pool.run(func, tasks, desc)` hands the
tasks out a few ahead of the results it has yielded, yields the results in task order with a progress
bar, and is a safe point (dbpkit.cli's) every STOP_POLL seconds while it waits.

  local: a concurrent.futures.ProcessPoolExecutor whose processes come from a fork server (a fresh
         process, started with Ctrl-C ignored, which every worker inherits: no thread or lock of the run
         is copied into them; they end the moment the run's process ends, however it ends).
  ray:   `ray.remote` tasks with retries (dbpkit.ray_engine).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import itertools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from dbpkit.cli import check_stop, progress, stage
from dbpkit.errors import WorkerDied
from dbpkit.faults import pause_task

TASKS_AHEAD = 4  # per worker: batches handed out before their results are used, so a slow one stalls nothing
BATCHES_PER_WORKER = 32  # many light tasks go out in batches, about this many per worker (each costs ~0.3 ms)
MAX_BATCH = 16  # tasks in a batch at most: a batch is redone whole when its Ray worker dies
STOP_POLL = 0.1  # seconds between safe points while waiting for tasks
PACKAGE = os.path.dirname(os.path.abspath(__file__))  # dbpkit: the tasks' code
PROJECT = os.path.dirname(PACKAGE)  # the scripts and dbp_utils.py beside it (a checkout, or site-packages)
DISTRIBUTORS = ("local", "ray")
EXIT_POLL = 0.5  # seconds between looks at the run's process where the system cannot say when it ends
FORK_SERVER_VARIABLE = "DBP_FORK_SERVER"  # set to the run's pid for the fork server it starts
# A result's pickle at most this long goes back through the pipe itself: with the executor's own wrapping (a
# few hundred bytes), within what the system writes to a pipe at once (4096 on Linux, 512 on macOS)
IN_PIPE_BYTES = select.PIPE_BUF // 2

# The fork server imports this module (see _start_executor). When the run ends, so does the fork server, which
# then skips the interpreter's teardown: it holds no output of ours, and torch's teardown alone takes 0.3 s,
# for which anything reading the run's output (a pipe, `timeout`) would wait.
if os.environ.pop(FORK_SERVER_VARIABLE, None) == str(os.getppid()):
    atexit.register(os._exit, 0)


def add_distributor_flag(parser: Any) -> None:
    parser.add_argument("--distributor", default="local", choices=DISTRIBUTORS,
                        help="local (default): worker processes on this machine; ray: Ray tasks on the cluster "
                             "in RAY_ADDRESS (auto: the one `ray start` began here), or on a Ray started for the "
                             "run. With ray, the code, inputs and output folder must be on storage every node "
                             "sees; the outputs are the same bytes either way")


def on(distributor: str) -> str:
    """Words for a run's summary line: where its tasks ran, when not on this machine."""
    return " on Ray" if distributor == "ray" else ""


def check_distributor(distributor: str) -> None:
    """Refuse --distributor ray at once, before any work, when Ray is not installed."""
    if distributor == "ray":
        from dbpkit.ray_engine import import_ray

        import_ray()


class TaskPool:
    """Runs tasks with `workers` processes (local) or on Ray; with one local worker, in this process."""

    def __init__(self, workers: int, distributor: str = "local", preload: tuple[str, ...] = ()):
        self.workers, self.distributor, self.preload = workers, distributor, preload
        self.engine, self.runs = None, []

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for run in self.runs:  # a run left mid-way (its consumer failed): its bar ends now, before any error line
            run.close()
        if self.engine is not None:
            self.engine.stop(killed=exc_type is not None)  # a failed or stopped run stops its workers at once

    def run(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, unit: str = "cluster",
            total: int | None = None, resources: dict | None = None) -> Iterator[Any]:
        """func over tasks, in task order; a task's exception is raised here. Tasks are drawn from the iterable
        only as they are handed out, so a lazy one never sits in memory whole. `resources` (Ray's: num_gpus)
        are what each task needs on a cluster."""
        run = self._run(func, tasks, desc, unit, len(tasks) if total is None else total, resources or {})
        self.runs.append(run)
        return run

    def submit(self, func: Callable[[Any], Any], task: Any) -> Callable[[], Any]:
        """Start func(task) beside the runs; what it returns gives its result when called. (In this process,
        with one local worker: then func runs when its result is asked for.)"""
        if self._in_process(2):
            return lambda: func(task)
        engine = self._engine()
        handle = engine.submit(func, task, {})

        def result() -> Any:
            while not engine.wait(handle, STOP_POLL):
                check_stop()
            return engine.result(handle)
        return result

    def start(self) -> None:
        """Start the workers now rather than at the first task: called before work this process does alone
        (k-means training, imports), so that the workers' start-up overlaps it. Locally that is the fork
        server's imports, under way when this returns (a task handed out waits for them); on Ray, Ray's
        start-up and each worker's imports."""
        if not self._in_process(2):
            engine = self._engine()
            if self.distributor == "ray":
                for _ in range(engine.slots):
                    engine.submit(_import_all, (*_our_modules(package_only=True), *self.preload), {})

    def prepare(self) -> None:
        """Locally, start the workers' fork server and its imports now, before this process checks its inputs:
        nothing to undo if a check fails (the fork server ends with this process), and at LAION's scale the
        checks (thousands of parts) take as long as the imports. On Ray, nothing: connecting waits for start()."""
        if self.distributor == "local" and self.workers > 1:
            _start_fork_server(self.preload)

    def _in_process(self, total: int) -> bool:
        return self.distributor == "local" and (self.workers <= 1 or total <= 1)

    def _engine(self) -> Any:
        if self.engine is None:
            if self.distributor == "ray":
                from dbpkit.ray_engine import RayEngine

                self.engine = RayEngine(self.workers, self.preload)
            else:
                self.engine = LocalEngine(self.workers, self.preload)
        return self.engine

    def _run(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, unit: str, total: int,
             resources: dict) -> Iterator[Any]:
        with progress(total, desc, unit) as bar:
            if self._in_process(total):
                stage(f"{desc} started")  # (stages are named for fault-injection tests)
                results = (run_task(func, task) for task in tasks)
            else:
                results = self._ordered(func, tasks, desc, resources, total)
            for done, result in enumerate(results):
                if done == 0:
                    stage(f"{desc} under way")
                bar.update()  # a safe point, also between tasks run in this process
                yield result

    def _ordered(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, resources: dict,
                 total: int) -> Iterator[Any]:
        engine = self._engine()
        # Tasks go out in batches when there are many of them (a task per cluster), so that handing them out
        # costs little beside their work; a task needing resources (a GPU) goes alone.
        size = 1 if resources else min(MAX_BATCH, max(1, total // (engine.slots * BATCHES_PER_WORKER)))
        todo, pending, started = _batches(tasks, size), [], False
        while True:
            # Keep every worker busy, but never run far ahead of the results handed out.
            while len(pending) < TASKS_AHEAD * engine.slots and (batch := next(todo, _END)) is not _END:
                pending.append(engine.submit(run_batch, (func, batch), resources))
            if not started:
                stage(f"{desc} started")  # the workers are running
                started = True
            if not pending:
                return
            engine.wait(pending[0], STOP_POLL)  # the next result in order (or a safe point to stop at)
            check_stop()
            for handle in engine.finished(pending):  # a failed task stops the run at once, not when its turn comes
                engine.result(handle)
            while pending and engine.wait(pending[0], 0):
                yield from engine.result(pending.pop(0))


_END = object()


def _our_modules(package_only: bool = False) -> list[str]:
    """numpy and this project's modules the run has imported (only the package's, for a cluster's workers,
    which have the package but not the scripts): what every task's worker needs."""
    ours = (PACKAGE,) if package_only else (PACKAGE, PROJECT)
    return ["numpy", *(name for name, module in list(sys.modules.items()) if name != "__main__" and
                       os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "/")) in ours)]


def _import_all(names: tuple[str, ...]) -> None:
    """A task that only imports: it starts a worker and leaves it ready for the tasks to come."""
    for name in names:
        importlib.import_module(name)


def run_task(func: Callable[[Any], Any], task: Any) -> Any:
    """A task, as every engine runs it (and where a fault test may stop it: dbpkit.faults)."""
    pause_task(func.__name__)
    return func(task)


def run_batch(batch: tuple[Callable[[Any], Any], list]) -> list:
    """Several tasks of one function in a worker, in order: their results."""
    func, tasks = batch
    return [run_task(func, task) for task in tasks]


def _batches(tasks: Iterable[Any], size: int) -> Iterator[list]:
    """The tasks in lists of `size` (the last shorter), drawn from the iterable as each list is needed."""
    todo = iter(tasks)
    while batch := list(itertools.islice(todo, size)):
        yield batch


# ---------------------------------------------------------------------------------------------
# local: a process pool from a fork server
# ---------------------------------------------------------------------------------------------


class LocalEngine:
    """Tasks in a ProcessPoolExecutor. Its workers hand their results back through one pipe, and a worker killed
    mid-message (by the run stopping, or by the system) would leave half of one in it, for which the executor's
    reader then waits without end (CPython 3.11's does: the main process holds the pipe's other end, so it never
    closes). So only what the system writes to a pipe at once (PIPE_BUF bytes) goes through it; a larger result
    goes through a file of the pool's own folder, its name through the pipe."""

    def __init__(self, workers: int, preload: tuple[str, ...]):
        self.slots = workers
        self.others = set(multiprocessing.active_children())  # children not of this pool (a caller's own)
        self.folder = tempfile.mkdtemp(prefix="dbp_results_")
        self.executor = _start_executor(workers, preload)

    def submit(self, func: Callable[[Any], Any], task: Any, resources: dict) -> Any:
        try:
            return self.executor.submit(_handed_back, self.folder, func, task)
        except BrokenProcessPool:
            raise WorkerDied from None

    def wait(self, future: Any, timeout: float) -> bool:
        return bool(wait([future], timeout=timeout).done)

    def finished(self, futures: list) -> list:
        return [f for f in futures if f.done()]

    def result(self, future: Any) -> Any:
        try:
            result = future.result()
        except BrokenProcessPool:
            raise WorkerDied from None
        return result.result if isinstance(result, InFile) else result

    def stop(self, killed: bool) -> None:
        if killed:  # stop at once, mid-task: the run is over
            if hasattr(self.executor, "kill_workers"):  # Python 3.14
                self.executor.kill_workers()
            else:  # Before 3.14: the pool's workers are this process's multiprocessing children it did not have
                # before (killing only some would leave a queue's lock held by a dead one).
                for process in set(multiprocessing.active_children()) - self.others:
                    process.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)  # (results not taken: the run stopped)


@dataclass
class InFile:
    """A task's result, pickled into a file: what goes through the pipe in its place."""

    path: str

    @functools.cached_property
    def result(self) -> Any:  # (read once: a run asks again for the results it looked through for failures)
        with open(self.path, "rb") as f:
            result = pickle.load(f)
        os.remove(self.path)
        return result


def _handed_back(folder: str, func: Callable[[Any], Any], task: Any) -> Any:
    """In a worker: the task's result, as it goes back through the pipe (see LocalEngine)."""
    result = run_task(func, task)
    pickled = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    if len(pickled) <= IN_PIPE_BYTES:
        return result
    fd, path = tempfile.mkstemp(suffix=".pickle", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(pickled)
    return InFile(path)


def _start_executor(workers: int, preload: tuple[str, ...]) -> ProcessPoolExecutor:
    _start_fork_server(preload)
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started, initargs=(os.getpid(),))


def _start_fork_server(preload: tuple[str, ...]) -> None:
    """The fork server the workers come from, started once per run. It imports numpy, this project's modules the
    run has imported and `preload`, so that each worker starts with them (it is given this project's folder on
    its path for that, which Python 3.11's fork server does not pass on by itself)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload([*_our_modules(), *preload])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C now waits, and reaches our handler below
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The resource tracker frees the pool's semaphores when this process is killed, and need not say so.
    with _environment(PYTHONWARNINGS="ignore:resource_tracker:UserWarning", PYTHONPATH=PROJECT,
                      **{FORK_SERVER_VARIABLE: str(os.getpid())}):
        try:
            multiprocessing.resource_tracker.ensure_running()
            multiprocessing.forkserver.ensure_running()  # exec'd ignoring Ctrl-C, which it keeps and passes on
        finally:
            signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    atexit.unregister(_end_fork_server)  # (once, however many pools this process starts)
    atexit.register(_end_fork_server, os.getpid())


def _end_fork_server(owner: int) -> None:
    """At this process's exit: end the fork server it started, at once. Left to itself, it would end only after
    its imports: a run stopped by a bad input a moment after starting it would leave it importing torch (a second
    or more of a core) for nothing. Its workers have ended by then, or end with this process (_worker_started)."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid  # (the standard library keeps it there)
    if pid is not None and os.getpid() == owner:  # (not in a child forked from this process, exiting)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def _environment(**added: str) -> Iterator[None]:
    """Environment variables with `added` joined to their values (comma- or colon-separated), for the
    processes started in the block."""
    saved = {name: os.environ.get(name) for name in added}
    for name, value in added.items():
        separator = "," if name == "PYTHONWARNINGS" else os.pathsep
        os.environ[name] = separator.join(filter(None, [saved[name], value]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _worker_started(run: int) -> None:
    """In each worker: end the moment the run's process ends, however it ends (SIGKILL included), so that no
    worker outlives a killed run. (Its parent is the fork server, which itself lives as long as any worker
    holds its pipe, so the parent's death is no signal: the run's is.)"""
    exit_with(run)


def exit_with(run: int) -> None:
    """End this process the moment process `run` ends: a thread waits on a pidfd (Linux) or a kqueue process
    event (macOS, BSD), else looks every EXIT_POLL seconds whether it is still there."""
    if hasattr(os, "pidfd_open"):
        try:
            ended = os.pidfd_open(run)  # readable once the process has ended
        except ProcessLookupError:  # already gone
            os._exit(1)
        wait = functools.partial(select.select, [ended], [], [])
    elif hasattr(select, "kqueue"):
        queue = select.kqueue()
        watch = select.kevent(run, filter=select.KQ_FILTER_PROC, flags=select.KQ_EV_ADD, fflags=select.KQ_NOTE_EXIT)
        try:
            queue.control([watch], 0)
        except ProcessLookupError:
            os._exit(1)
        wait = functools.partial(queue.control, None, 1)
    else:
        wait = functools.partial(_poll_until_gone, run)
    threading.Thread(target=_exit_after, args=(wait,), daemon=True).start()


def _poll_until_gone(run: int) -> None:
    while True:
        try:
            os.kill(run, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # there, but another user's: a pid taken again after the run ended
            return
        time.sleep(EXIT_POLL)


def _exit_after(wait: Callable[[], Any]) -> None:
    wait()
    os._exit(1)
