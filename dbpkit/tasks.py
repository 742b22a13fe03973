"""Tasks: units of work that read their inputs from files, write their outputs into the run's folder and
return small metadata, run in worker processes on this machine or as Ray tasks on a cluster (ray_engine).

One task model for both distributors. A task must be safe to run twice (Ray runs a task again when its
worker dies): it writes its outputs whole, under names of its own. `pool.run(func, tasks, desc)` hands the
tasks out a few ahead of the results it has yielded, yields the results in task order with a progress
bar, and is a safe point (dbpkit.cli's) every STOP_POLL seconds while it waits.

  local: worker processes from a fork server, in a concurrent.futures.ProcessPoolExecutor (dbpkit.local_engine).
  ray:   `ray.remote` tasks with retries (dbpkit.ray_engine).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dbpkit.cli import STOP_POLL, check_stop, progress, stage
from dbpkit.faults import pause_task

TASKS_AHEAD = 4  # per worker: batches handed out before their results are used, so a slow one stalls nothing
BATCHES_PER_WORKER = 32  # many light tasks go out in batches, about this many per worker (each costs ~0.3 ms)
MAX_BATCH = 16  # tasks in a batch at most: a batch is redone whole when its Ray worker dies
PACKAGE = os.path.dirname(os.path.abspath(__file__))  # dbpkit: the tasks' code
PROJECT = os.path.dirname(PACKAGE)  # the scripts and dbp_utils.py beside it (a checkout, or site-packages)
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
        from dbpkit.ray_engine import import_ray

        import_ray()


class TaskPool:
    """Runs tasks with `workers` processes (local) or on Ray; with one local worker, in this process. Tasks that
    start `commands` (webdataset's, for pipe: and URL shards) have them ended with their worker when the run stops:
    locally each worker leads a process group for them; Ray's raylet ends a worker's children itself."""

    def __init__(self, workers: int, distributor: str = "local", preload: tuple[str, ...] = (),
                 commands: bool = False):
        self.workers, self.distributor, self.preload, self.commands = workers, distributor, preload, commands
        self.engine, self.runs = None, []

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for run in self.runs:  # a run left mid-way (its consumer failed): its bar ends now, before any error line
            run.close()
        if self.engine is not None:
            self.engine.stop(killed=exc_type is not None)  # a failed or stopped run stops its workers at once

    def run(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, unit: str = "cluster",
            total: int | None = None, resources: dict | None = None, streams: bool = False) -> Iterator[Any]:
        """func over tasks, in task order; a task's exception is raised here. Tasks are drawn from the iterable
        only as they are handed out, so a lazy one never sits in memory whole. `resources` (Ray's: num_gpus)
        are what each task needs on a cluster. Tasks that read streams (pipe: commands, URLs), which can stall
        for ever, run in workers even one at a time: waiting for a worker is a safe point, a read is not."""
        total = len(tasks) if total is None else total
        run = self._run(func, tasks, desc, unit, total, resources or {}, self._in_process(total) and not streams)
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
                    engine.submit(_import_all, (*our_modules(package_only=True), *self.preload), {})

    def prepare(self) -> None:
        """Locally, start the workers' fork server and its imports now, before this process checks its inputs:
        nothing to undo if a check fails (the fork server ends with this process), and at LAION's scale the
        checks (thousands of parts) take as long as the imports. On Ray, nothing: connecting waits for start()."""
        if self.distributor == "local" and self.workers > 1:
            from dbpkit.local_engine import start_fork_server

            start_fork_server(self.preload)

    def _in_process(self, total: int) -> bool:
        return self.distributor == "local" and (self.workers <= 1 or total <= 1)

    def _engine(self) -> Any:
        if self.engine is None:
            if self.distributor == "ray":
                from dbpkit.ray_engine import RayEngine

                self.engine = RayEngine(self.workers, self.preload)
            else:
                from dbpkit.local_engine import LocalEngine

                self.engine = LocalEngine(self.workers, self.preload, self.commands)
        return self.engine

    def _run(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, unit: str, total: int,
             resources: dict, in_process: bool) -> Iterator[Any]:
        with progress(total, desc, unit) as bar:
            if in_process:
                stage(f"{desc} started")  # (stages are named for fault-injection tests)
                results = (run_task(func, task) for task in tasks)
            else:
                # (its rate and time left count from when the workers are running, not from their start-up:
                # the fork server's imports would make the first estimate of a LAION run a day too long)
                results = self._ordered(func, tasks, desc, resources, total, bar.unpause)
            for done, result in enumerate(results):
                if done == 0:
                    stage(f"{desc} under way")
                bar.update()  # a safe point, also between tasks run in this process
                yield result

    def _ordered(self, func: Callable[[Any], Any], tasks: Iterable[Any], desc: str, resources: dict,
                 total: int, running: Callable[[], Any]) -> Iterator[Any]:
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
                running()
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


def search_path() -> str:
    """This process's sys.path as a PYTHONPATH ('' as the folder it stands for): given to the processes that run the
    tasks, so that they import what this process imported from the same files, not another checkout's."""
    return os.pathsep.join(entry or os.getcwd() for entry in sys.path)


def our_modules(package_only: bool = False) -> list[str]:
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


@contextlib.contextmanager
def environment(replaced: dict[str, str] | None = None, **added: str) -> Iterator[None]:
    """Environment variables with `added` joined to their values (comma- or colon-separated) and `replaced` set in
    place of theirs, for the processes started in the block."""
    replaced = replaced or {}
    saved = {name: os.environ.get(name) for name in [*added, *replaced]}
    for name, value in added.items():
        separator = "," if name == "PYTHONWARNINGS" else os.pathsep
        os.environ[name] = separator.join(filter(None, [saved[name], value]))
    os.environ.update(replaced)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
