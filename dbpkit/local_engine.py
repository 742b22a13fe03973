"""Tasks on this machine: dbpkit.tasks's engine for --distributor local, a ProcessPoolExecutor whose worker
processes come from a fork server.

The fork server is a fresh process, started with Ctrl-C ignored (which every worker inherits), that imports
what the tasks need once (torch: a second or more) and forks each worker from there: no thread or lock of the
run is copied into them. Workers end the moment the run's process ends, however it ends, and the fork server
with it. Results and exceptions come back through the executor's pipe only when one write carries them whole;
larger ones through files (see LocalEngine).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import secrets
import select
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from dbpkit.errors import WorkerDied
from dbpkit.tasks import environment, our_modules, run_task, search_path

EXIT_POLL = 0.5  # seconds between looks at the run's process where the system cannot say when it ends
FORK_SERVER_VARIABLE = "DBP_FORK_SERVER"  # set to the run's pid for the fork server it starts
# A result's pickle at most this long goes back through the pipe itself: with the executor's own wrapping (a
# few hundred bytes), within what the system writes to a pipe at once (4096 on Linux, 512 on macOS)
IN_PIPE_BYTES = select.PIPE_BUF // 2

# The fork server imports this module (see start_fork_server). When the run ends, so does the fork server, which
# then skips the interpreter's teardown: it holds no output of ours, and torch's teardown alone takes 0.3 s,
# for which anything reading the run's output (a pipe, `timeout`) would wait.
if os.environ.pop(FORK_SERVER_VARIABLE, None) == str(os.getppid()):
    atexit.register(os._exit, 0)


class LocalEngine:
    """Tasks in a ProcessPoolExecutor. Its workers hand their results back through one pipe, and a worker killed
    mid-message (by the run stopping, or by the system) would leave half of one in it, for which the executor's
    reader then waits without end (CPython 3.11's does: the main process holds the pipe's other end, so it never
    closes). So only what the system writes to a pipe at once (PIPE_BUF bytes) goes through it; a larger result
    goes through a file of the pool's own folder, its name through the pipe. A task's exception goes back the same
    way, as a result (the executor would send it with its traceback, whatever their length)."""

    def __init__(self, workers: int, preload: tuple[str, ...], commands: bool = False):
        self.slots = workers
        self.others = set(multiprocessing.active_children())  # children not of this pool (a caller's own)
        # Made by the first result too large for the pipe, if one comes (most runs have none): so a run killed
        # together with its workers (kill -9 of its process group) leaves no folder behind unless one was under way.
        self.folder = os.path.join(tempfile.gettempdir(), f"dbp_results_{secrets.token_hex(8)}")
        self.executor = _start_executor(workers, preload, self.folder, commands)

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
        result = result.result if isinstance(result, InFile) else result
        if isinstance(result, Raised):
            raise result.error from WorkerTraceback(result.trace)
        return result

    def stop(self, killed: bool) -> None:
        if killed:  # stop at once, mid-task: the run is over. The pool's workers are this process's multiprocessing
            # children it did not have before (killing only some would leave a queue's lock held by a dead one);
            # a worker leading a process group (lead_own_group) is killed with it, the commands it started in it.
            for process in set(multiprocessing.active_children()) - self.others:
                signal_group(process.pid, signal.SIGKILL)
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


@dataclass
class Raised:
    """A task's exception, handed back as a result: raised again in the run, the worker's traceback as its cause."""

    error: Exception
    trace: str


class WorkerTraceback(Exception):
    """Where in a worker a task's exception was raised (shown with --debug)."""


def _handed_back(folder: str, func: Callable[[Any], Any], task: Any) -> Any:
    """In a worker: the task's result or exception, as it goes back through the pipe (see LocalEngine)."""
    try:
        result = run_task(func, task)
    except Exception as e:
        result = Raised(e, "".join(traceback.format_exception(e)))
    pickled = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    if len(pickled) <= IN_PIPE_BYTES:
        return result
    os.makedirs(folder, mode=0o700, exist_ok=True)  # (its name unguessable, as mkdtemp's; the workers share it)
    fd, path = tempfile.mkstemp(suffix=".pickle", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(pickled)
    return InFile(path)


def _start_executor(workers: int, preload: tuple[str, ...], folder: str, commands: bool) -> ProcessPoolExecutor:
    start_fork_server(preload)
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started,
                               initargs=(os.getpid(), folder, commands))


def start_fork_server(preload: tuple[str, ...]) -> None:
    """The fork server the workers come from, started once per run. It imports numpy, this project's modules the
    run has imported and `preload`, so that each worker starts with them, from the files this process imported.
    Python 3.11's fork server is not given this process's path (CPython gh-117378, mended in 3.12) and searches the
    current folder first: a checkout there, or another on PYTHONPATH, would give the workers its code. So its
    PYTHONPATH is this process's path, and PYTHONSAFEPATH leaves out the current folder (3.11 and later; 3.10 has
    no such switch)."""
    multiprocessing.get_context("forkserver").set_forkserver_preload([*our_modules(), *preload])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C now waits, and reaches our handler below
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The resource tracker frees the pool's semaphores when this process is killed, and need not say so.
    with environment({"PYTHONPATH": search_path(), "PYTHONSAFEPATH": "1"},
                     PYTHONWARNINGS="ignore:resource_tracker:UserWarning", **{FORK_SERVER_VARIABLE: str(os.getpid())}):
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


def _worker_started(run: int, folder: str, commands: bool) -> None:
    """In each worker: end the moment the run's process ends, however it ends (SIGKILL included), so that no
    worker outlives a killed run; the pool's results folder goes with them (the run, killed, could not remove
    it). (Its parent is the fork server, which itself lives as long as any worker holds its pipe, so the
    parent's death is no signal: the run's is.) A pool whose tasks start `commands` has each worker lead a
    process group, which the run ends whole (LocalEngine.stop, exit_with)."""
    if commands:
        lead_own_group()
    exit_with(run, remove=folder)


def lead_own_group() -> None:
    """Make this worker the leader of a process group of its own, which the commands it starts (a pipe: command
    reading a shard, curl for a URL) join: they ignore Ctrl-C, as the worker does, so that a stalled one would
    outlive the run, which therefore ends the group with the worker (signal_group). Out of the terminal's group,
    a write to the terminal is let through under `stty tostop` (SIGTTOU ignored, as POSIX provides for) rather
    than stopping the worker."""
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.setpgid(0, 0)


def signal_group(pid: int, signum: int) -> None:
    """`signum` to the process group process `pid` leads, with the commands in it; to that process alone if it
    leads none (yet: a worker still starting)."""
    with contextlib.suppress(ProcessLookupError):  # (gone already)
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def exit_with(run: int, remove: str | None = None) -> None:
    """End this process the moment process `run` ends, removing the folder `remove` first: a thread waits on a
    pidfd (Linux) or a kqueue process event (macOS, BSD), else looks every EXIT_POLL seconds whether it is
    still there."""
    if hasattr(os, "pidfd_open"):
        try:
            ended = os.pidfd_open(run)  # readable once the process has ended
        except ProcessLookupError:  # already gone
            _exit_after(lambda: None, remove)
        wait = functools.partial(select.select, [ended], [], [])
    elif hasattr(select, "kqueue"):
        queue = select.kqueue()
        watch = select.kevent(run, filter=select.KQ_FILTER_PROC, flags=select.KQ_EV_ADD, fflags=select.KQ_NOTE_EXIT)
        try:
            queue.control([watch], 0)
        except ProcessLookupError:
            _exit_after(lambda: None, remove)
        wait = functools.partial(queue.control, None, 1)
    else:
        wait = functools.partial(_poll_until_gone, run)
    threading.Thread(target=_exit_after, args=(wait, remove), daemon=True).start()


def _poll_until_gone(run: int) -> None:
    while True:
        try:
            os.kill(run, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # there, but another user's: a pid taken again after the run ended
            return
        time.sleep(EXIT_POLL)


def _exit_after(wait: Callable[[], Any], remove: str | None) -> None:
    wait()
    if remove is not None:  # (every worker tries: whichever comes first removes it)
        shutil.rmtree(remove, ignore_errors=True)
    if os.getpgrp() == os.getpid():  # a worker leading its group: its commands end with it
        os.killpg(0, signal.SIGKILL)
    os._exit(1)
