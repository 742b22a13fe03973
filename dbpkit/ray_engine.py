"""Tasks on Ray: the same tasks as dbpkit.tasks runs locally, as `ray.remote` calls on the cluster in
RAY_ADDRESS (`auto`: the one `ray start` began on this machine), or on a Ray started for the run and stopped
at its end.

The code reaches a cluster's workers through Ray's runtime_env (this package, uploaded by Ray), so only the
inputs and the output folder must be on storage every node sees, at the same paths (the driver makes every
path absolute). Connecting is bounded and stays a safe point; a token the cluster refuses is named.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dbpkit
from dbpkit.cli import check_stop, log, stage, take_signals
from dbpkit.errors import UsageError, WorkerDied
from dbpkit.faults import passed_on
from dbpkit.tasks import STOP_POLL, environment, run_task, search_path

RAY_RETRIES = 3  # times Ray runs a task again whose worker died
RAY_EXTRA = "pip install 'density-based-pruning[ray]'"
RAY_CONNECT_TIMEOUT = 60.0  # seconds to join RAY_ADDRESS's cluster or start one (DBP_RAY_CONNECT_TIMEOUT)
RAY_CONNECT_VARIABLE = "DBP_RAY_CONNECT_TIMEOUT"
TOKEN_REFUSED = (b"Unauthenticated", b"InvalidAuthToken")  # in Ray's core's messages on a refused token


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--distributor", "ray needs Ray, which is not installed",
                         f"install it with {RAY_EXTRA}") from None
    return ray


class RayEngine:
    """Tasks as `ray.remote` calls: retried when their worker dies (RAY_RETRIES times), never for their own
    errors. Joins the cluster in RAY_ADDRESS, else starts a Ray of `workers` CPUs for the run and stops it
    (all its processes) at the end."""

    def __init__(self, workers: int, preload: tuple[str, ...]):
        self.ray = import_ray()
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
            return self.ray.get(handle)
        except RayTaskError as e:  # the task's own exception (a UsageError, say), without Ray's wrapping
            raise (e.cause if isinstance(e.cause, Exception) else RuntimeError(str(e))) from None
        except RayError as e:  # a worker or node lost past its retries
            raise WorkerDied(f"a Ray task's worker died ({type(e).__name__})") from None
        finally:
            self.handles.discard(handle)  # (holding every handle would keep every result in Ray's store)

    def stop(self, killed: bool) -> None:
        if killed and self.handles:
            # Only the tasks still running. Ray's core once aborted this process with a stack trace instead of our
            # line ("Tried to complete task that was not pending", in CI) as a run force-cancelled every task it
            # had, the one already ended with the error among them: a finished task needs no cancelling.
            try:
                _, running = self.ray.wait(list(self.handles), num_returns=len(self.handles), timeout=0)
            except Exception:  # (Ray in a state where it cannot say: cancel them all)
                running = list(self.handles)
            for handle in running:
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
            if address:  # the cluster's workers get this package from Ray (runtime_env), not from shared storage
                ray.init(address=address, runtime_env={"py_modules": [dbpkit], "env_vars": passed_on()}, **quiet)
            else:  # a Ray of our own: its workers inherit this process's environment ("local": a new one, even
                # beside a `ray start` cluster)
                ray.init(address="local", num_cpus=workers, include_dashboard=False, **quiet)
        except BaseException as e:  # noqa: B036 (handed to the main thread, which raises it or our line)
            outcome.append(e)
            return
        outcome.append(None)
        released.wait()

    where = f"the cluster at RAY_ADDRESS={address}" if address else "a Ray for this run"
    group = os.getpgrp()
    thread = threading.Thread(target=init, name="ray-connect", daemon=True)  # (abandoned if it never returns)
    # A Ray of the run's own: its workers import what this process imported, from the same files (search_path)
    ours = environment({"PYTHONPATH": search_path()}) if not address else contextlib.nullcontext()
    with ours, _stderr_aside(outcome) as said:
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
    # Ray's core has given SIGTERM to abseil's failure handler, which prints a stack dump and arms an abort for 3 s
    # later before it hands the signal on: the run's own handler again.
    take_signals()
    if os.getpgrp() != group:
        # Where the kernel cannot end a Ray's processes with the run (macOS), ray.init starts a reaper for them, and
        # first makes the run lead a process group of its own: out of the terminal's foreground group, a Ctrl-C
        # would no longer reach a run that a script started. Back into its group (unless none is left of it: the
        # run was its last member); Ray's processes, the reaper's to end, stay in the new one.
        with contextlib.suppress(OSError):
            os.setpgid(0, group)
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
