"""Tasks: units of work that read their inputs from files, write their outputs into the run's folder and
return small metadata, run in worker processes on this machine or as Ray tasks on a cluster.

One task model for both distributors. A task must be safe to run twice (Ray runs a task again when its
worker dies): it writes its outputs whole, under names of its own. `pool.run(func, tasks, desc)` hands the
tasks out a few ahead of the results it has yielded, yields the results in task order with a progress
bar, and is a safe point (dbp_cli's) every STOP_POLL seconds while it waits.

  local: a concurrent.futures.ProcessPoolExecutor whose processes come from a fork server (a fresh
         process, started with Ctrl-C ignored, which every worker inherits: no thread or lock of the run
         is copied into them; they end the moment the run's process ends, however it ends).
  ray:   `ray.remote` tasks with retries, on the cluster in RAY_ADDRESS (`auto`: the one `ray start`
         began on this machine), or on a Ray started for the run and stopped at its end. The code, the
         inputs and the output folder must be on storage every node sees, at the same paths.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dbp_cli import PAUSE_VARIABLE, UsageError, WorkerDied, check_stop, log, progress, stage

TASKS_AHEAD = 4  # per worker: tasks handed out before their results are used, so a slow one stalls nothing
STOP_POLL = 0.1  # seconds between safe points while waiting for tasks
RAY_RETRIES = 3  # times Ray runs a task again whose worker died
RAY_EXTRA = "pip install 'density-based-pruning[ray]'"
RAY_CONNECT_TIMEOUT = 60.0  # seconds to join RAY_ADDRESS's cluster or start one (DBP_RAY_CONNECT_TIMEOUT)
RAY_CONNECT_VARIABLE = "DBP_RAY_CONNECT_TIMEOUT"
TOKEN_REFUSED = (b"Unauthenticated", b"InvalidAuthToken")  # in Ray's core's messages on a refused token
HERE = os.path.dirname(os.path.abspath(__file__))  # this project's modules: the tasks' code
DISTRIBUTORS = ("local", "ray")


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
        _import_ray()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--distributor", "ray needs Ray, which is not installed",
                         f"install it with {RAY_EXTRA}") from None
    return ray


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
        (k-means training), so that Ray's start-up and the workers' imports overlap it."""
        if not self._in_process(2):
            engine = self._engine()
            for _ in range(engine.slots):
                engine.submit(_import_all, (*_our_modules(), *self.preload), {})

    def _in_process(self, total: int) -> bool:
        return self.distributor == "local" and (self.workers <= 1 or total <= 1)

    def _engine(self) -> Any:
        if self.engine is None:
            self.engine = (RayEngine if self.distributor == "ray" else LocalEngine)(self.workers, self.preload)
        return self.engine

    def _run(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, unit: str, total: int,
             resources: dict) -> Iterator[Any]:
        with progress(total, desc, unit) as bar:
            if self._in_process(total):
                stage(f"{desc} started")  # (stages are named for fault-injection tests)
                results = (run_task(func, task) for task in tasks)
            else:
                results = self._ordered(func, tasks, desc, resources)
            for done, result in enumerate(results):
                if done == 0:
                    stage(f"{desc} under way")
                bar.update()  # a safe point, also between tasks run in this process
                yield result

    def _ordered(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, resources: dict) -> Iterator[Any]:
        engine = self._engine()
        todo, pending, started = iter(tasks), [], False
        while True:
            # Keep every worker busy, but never run far ahead of the results handed out.
            while len(pending) < TASKS_AHEAD * engine.slots and (task := next(todo, _END)) is not _END:
                pending.append(engine.submit(func, task, resources))
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
                yield engine.result(pending.pop(0))


_END = object()


def _our_modules() -> list[str]:
    """numpy and this project's modules the run has imported: what every task's worker needs."""
    return ["numpy", *(name for name, module in list(sys.modules.items())
                       if os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "/")) == HERE)]


def _import_all(names: tuple[str, ...]) -> None:
    """A task that only imports: it starts a worker and leaves it ready for the tasks to come."""
    for name in names:
        importlib.import_module(name)


def run_task(func: Callable[[Any], Any], task: Any) -> Any:
    """A task, as every engine runs it. For fault-injection tests, DBP_PAUSE_AT="task <name> <marker file>"
    stops the first task of that function to start (SIGSTOP) once it has written its pid to the marker file;
    the task run again after it is killed finds the marker and goes on."""
    pause = os.environ.get(PAUSE_VARIABLE, "")
    if pause.startswith("task ") and pause.split(" ", 2)[1] == func.__name__:
        with contextlib.suppress(FileExistsError):
            fd = os.open(pause.split(" ", 2)[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGSTOP)
    return func(task)


# ---------------------------------------------------------------------------------------------
# local: a process pool from a fork server
# ---------------------------------------------------------------------------------------------


class LocalEngine:
    """Tasks in a ProcessPoolExecutor. Results are small (tasks write their outputs to files), so a worker
    killed mid-task breaks the pool at once instead of leaving half a message in a pipe."""

    def __init__(self, workers: int, preload: tuple[str, ...]):
        self.slots = workers
        self.executor = _start_executor(workers, preload)

    def submit(self, func: Callable[[Any], Any], task: Any, resources: dict) -> Any:
        try:
            return self.executor.submit(run_task, func, task)
        except BrokenProcessPool:
            raise WorkerDied from None

    def wait(self, future: Any, timeout: float) -> bool:
        return bool(wait([future], timeout=timeout).done)

    def finished(self, futures: list) -> list:
        return [f for f in futures if f.done()]

    def result(self, future: Any) -> Any:
        try:
            return future.result()
        except BrokenProcessPool:
            raise WorkerDied from None

    def stop(self, killed: bool) -> None:
        if killed:  # stop at once, mid-task: the run is over
            for process in list(self.executor._processes.values()):  # (Python 3.14 has kill_workers())
                process.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)


def _start_executor(workers: int, preload: tuple[str, ...] = ()) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("forkserver")
    # The fork server imports numpy, this project's modules the run has imported and `preload`, so that
    # each worker starts with them (it is given this folder on its path for that, which Python 3.11's fork
    # server does not pass on by itself).
    context.set_forkserver_preload([*_our_modules(), *preload])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a Ctrl-C now waits, and reaches our handler below
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The resource tracker frees the pool's semaphores when this process is killed, and need not say so.
    with _environment(PYTHONWARNINGS="ignore:resource_tracker:UserWarning", PYTHONPATH=HERE):
        try:
            multiprocessing.resource_tracker.ensure_running()
            multiprocessing.forkserver.ensure_running()  # exec'd ignoring Ctrl-C, which it keeps and passes on
        finally:
            signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started, initargs=(os.getpid(),))


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
    """In each worker: end the moment the run's process ends, however it ends (SIGKILL included), so that
    no worker outlives a killed run. (Its parent is the fork server, which itself lives as long as any
    worker holds its pipe, so the parent's death is no signal: the run's is.)"""
    exit_with(run)


EXIT_POLL = 0.5  # seconds between looks at the run's process where the system cannot say when it ends


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


# ---------------------------------------------------------------------------------------------
# ray: the same tasks as Ray tasks
# ---------------------------------------------------------------------------------------------


class RayEngine:
    """Tasks as `ray.remote` calls: retried when their worker dies (RAY_RETRIES times), never for their own
    errors. Joins the cluster in RAY_ADDRESS, else starts a Ray of `workers` CPUs for the run and stops it
    (all its processes) at the end."""

    def __init__(self, workers: int, preload: tuple[str, ...]):
        self.ray = _import_ray()
        self.handles = set()  # the tasks whose results are not taken yet: what a stopped run cancels
        self.released = threading.Event()  # set once Ray is shut down: the thread that started it may end
        _connect(self.ray, workers, self.released)
        self.cluster = self.ray.cluster_resources()
        self.slots = max(1, int(self.cluster.get("CPU", workers)))
        self.remote = self.ray.remote(_ray_task)

    def submit(self, func: Callable[[Any], Any], task: Any, resources: dict) -> Any:
        if self.cluster.get("GPU", 0) < resources.get("num_gpus", 0):  # Ray would wait for one without end
            raise UsageError("--device", f"cuda: the Ray cluster has no GPU ({_resources(self.cluster)})",
                             "start its nodes with GPUs (ray start --num-gpus N), or pass --device cpu")
        options = {"max_retries": RAY_RETRIES, "retry_exceptions": False, "num_cpus": 1, **resources}
        handle = self.remote.options(**options).remote(func, task)
        self.handles.add(handle)
        return handle

    def wait(self, handle: Any, timeout: float) -> bool:
        ready, _ = self.ray.wait([handle], timeout=timeout)
        return bool(ready)

    def finished(self, handles: list) -> list:
        ready, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
        return ready

    def result(self, handle: Any) -> Any:
        from ray.exceptions import RayError, RayTaskError

        try:
            result = self.ray.get(handle)
        except RayTaskError as e:  # the task's own exception (a UsageError, say), without Ray's wrapping
            raise (e.cause if isinstance(e.cause, Exception) else RuntimeError(str(e))) from None
        except RayError as e:  # a worker or node lost past its retries
            raise WorkerDied(f"a Ray task's worker died ({type(e).__name__})") from None
        self.handles.discard(handle)  # (holding every handle would keep every result in Ray's store)
        return result

    def stop(self, killed: bool) -> None:
        if killed:
            for handle in self.handles:
                with contextlib.suppress(Exception):
                    self.ray.cancel(handle, force=True)
        self.ray.shutdown()  # and a Ray started for the run stops all its processes
        self.released.set()


def _connect(ray: Any, workers: int, released: threading.Event) -> None:
    """Join the cluster in RAY_ADDRESS, else start a Ray of `workers` CPUs for the run. ray.init waits without
    end for a cluster that is not there (a wrong port, a dead head's address file), so it runs in a thread of
    its own while this one stays a safe point (Ctrl-C and SIGTERM end the run at once) and gives up after
    DBP_RAY_CONNECT_TIMEOUT seconds (default 60). The thread lives until `released`: the processes of a Ray it
    starts are bound to it (they end when the thread that started them ends, as when the run's process ends)."""
    address = os.environ.get("RAY_ADDRESS")
    timeout = _connect_timeout()
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            if address:  # the cluster's workers find this project's code where it is on the shared storage
                passed = {name: os.environ[name] for name in (PAUSE_VARIABLE,) if name in os.environ}
                ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": HERE, **passed}}, **quiet)
            else:  # a Ray of our own: its workers inherit this process's environment ("local": a new one, even
                # beside a `ray start` cluster)
                ray.init(address="local", num_cpus=workers, include_dashboard=False, **quiet)
        except BaseException as e:  # noqa: B036 (handed to the main thread, which raises it or our line)
            outcome.append(e)
            return
        outcome.append(None)
        released.wait()

    where = f"the cluster at RAY_ADDRESS={address}" if address else "a Ray for this run"
    thread = threading.Thread(target=init, name="ray-connect", daemon=True)  # (abandoned if it never returns)
    with _environment(PYTHONPATH=HERE) if not address else contextlib.nullcontext(), _stderr_aside(outcome) as said:
        thread.start()
        stage("ray connecting")
        deadline = time.monotonic() + timeout
        while not outcome:
            thread.join(STOP_POLL)
            check_stop()
            if not outcome and _token_refused(said):
                raise UsageError("--distributor", f"ray: {where} refused this run's authentication token",
                                 _connect_fix(address, token=True))
            if not outcome and time.monotonic() > deadline:
                raise UsageError("--distributor", f"ray could not reach {where} within {timeout:g} s",
                                 _connect_fix(address))
    if (error := outcome[0]) is not None:
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise error
        raise UsageError("--distributor", f"ray cannot reach {where} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})",
                         _connect_fix(address, token=type(error).__name__ == "AuthenticationError")) from None


@contextlib.contextmanager
def _stderr_aside(connected: list) -> Iterator[Any]:
    """Ray's core prints its retries to the process's stderr (file descriptor 2) while it connects: they go to
    a file (yielded, for what they say), so that a run that cannot connect ends in our one line. Once Ray is
    connected (`connected` is not empty), descriptor 2 is stderr again; a connection given up on goes on
    printing to it until the process ends, so then it stays on the file and Python's stderr moves instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            if connected:
                os.dup2(saved, 2)
                os.close(saved)
            else:
                sys.stderr = open(saved, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
                for handler in log.handlers:  # (our warnings' handler holds the stream it was made with)
                    if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                        handler.setStream(sys.stderr)


def _token_refused(sink: Any) -> bool:
    """Whether Ray's core has said that the cluster refused this process's authentication token."""
    sink.seek(0)
    return any(word in sink.read() for word in TOKEN_REFUSED)


def _connect_timeout() -> float:
    value = os.environ.get(RAY_CONNECT_VARIABLE, "")
    try:
        timeout = float(value) if value else RAY_CONNECT_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise UsageError(RAY_CONNECT_VARIABLE, f"{value!r} is not a number of seconds above 0",
                         f"set it to the seconds to wait for Ray (default {RAY_CONNECT_TIMEOUT:g}), or unset it")
    return timeout


def _connect_fix(address: str | None, token: bool = False) -> str:
    """What to check when Ray cannot be reached: the token when the cluster refused it, else the address."""
    if token:
        return ("the cluster uses token authentication: pass its token as RAY_AUTH_TOKEN (or a file as "
                "RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it)")
    if address:
        return (f"check that a Ray head runs at {address} (`ray status`; auto: the `ray start` on this machine, "
                f"whose address file may outlive it), or unset RAY_ADDRESS to start a Ray for the run; "
                f"{RAY_CONNECT_VARIABLE} sets the seconds to wait")
    return f"check that Ray can start here (`ray start --head` says why not); {RAY_CONNECT_VARIABLE} sets the wait"


def _resources(resources: dict) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in sorted(resources.items()) if name.isupper()) or "none"


def _ray_task(func: Callable[[Any], Any], task: Any) -> Any:
    """A task on a Ray worker: an input this node cannot see is one clear line naming the path and the node."""
    try:
        return run_task(func, task)
    except FileNotFoundError as e:
        raise UsageError(e.filename or "an input", f"is not visible on node {socket.gethostname()}",
                         "put the inputs and the output folder on storage every node sees, at the same path") from None
