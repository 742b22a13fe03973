"""The command line: flags under both spellings, user mistakes as one line and exit status 2, Ctrl-C and
SIGTERM acted on at safe points, named stages, progress bars and the run's log.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import io
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from dbpkit import __version__
from dbpkit.errors import Incomplete, Terminated, UsageError, WorkerDied
from dbpkit.faults import pause_at

USAGE_EXIT = 2  # argparse's status for usage errors
SIGNAL_EXIT = 128  # a shell reports death by signal N as 128 + N
PROGRESS_DELAY = 0.5  # seconds before a progress bar is drawn, so a quick error stands alone
# Local --workers allowed per CPU: for work on the CPU, and for tasks that mostly wait on the network (make_report's,
# a remote shard each)
WORKERS_PER_CPU, IO_WORKERS_PER_CPU = 4, 16
C_INT_MAX = 2**31 - 1  # the largest count torch, faiss and OpenMP take (a C int)
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a full quota, a file past its size limit
STOPPED = "nothing unfinished was published (rerun the same command to run it again, or to finish it)"
log = logging.getLogger("dbp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's two-line usage error -> our one line
        if m := re.fullmatch(r"argument ([^/:]+)[^:]*: (.*)", message):
            raise UsageError(m[1], m[2], "see --help")
        if m := re.fullmatch(r"the following arguments are required: (.*)", message):
            raise UsageError(m[1], "is required", "see --help")
        if m := re.fullmatch(r"unrecognized arguments: (.*)", message):
            raise UsageError(m[1], "unrecognized argument", "see --help")
        raise UsageError(self.prog, message, "see --help")


def make_parser(doc: str, usage: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring and whose errors are one line."""
    parser = _Parser(description=doc, usage=usage, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s (density-based-pruning) {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (for bug reports)")
    return parser


def add_flag(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    """Add a flag under every spelling given plus its underscore and dash twins."""
    spellings: list[str] = []
    for name in names:
        word = name.removeprefix("--")
        for s in (word, word.replace("_", "-"), word.replace("-", "_")):
            if f"--{s}" not in spellings:
                spellings.append(f"--{s}")
    parser.add_argument(*spellings, dest=names[0].removeprefix("--").replace("-", "_"), **kwargs)


def add_workers_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--workers", type=int, default=None,
             help="processes for the per-cluster work (default: all cores); results are identical for any value")


def absolute_paths(args: argparse.Namespace, *names: str) -> None:
    """Make the path flags `names` absolute, here on the driver: a Ray worker starts in another folder (where
    `ray start` ran), and params.json names every input wherever it is read."""
    for name in names:
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(os.path.expanduser(getattr(args, name))))


def check_range(flag: str, value: float, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False, fix: str = "") -> None:
    """Raise a UsageError unless low <(=) value <(=) high; NaN always fails."""
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(flag, f"{value!r} is outside {interval}", fix or f"pass a value in {interval}")


def check_cuda() -> None:
    """Refuse --device cuda where torch sees no CUDA device (torch is imported only then)."""
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--device", "cuda was asked for, but torch sees no CUDA device",
                         "pass --device cpu, or run where a GPU is")


def num_workers(requested: int | None, distributor: str = "local", per_cpu: int = WORKERS_PER_CPU) -> int:
    """--workers, checked; all of this machine's CPUs by default. Locally they are processes (or threads) of this
    machine: more than `per_cpu` a CPU only contend for it, and a typo's thousands would swamp it (each shard's
    image decoding starts them all); on Ray, tasks in flight on the cluster."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested is None:
        return cpus
    if requested < 1:
        raise UsageError("--workers", f"{requested} is less than 1", "pass 1 or more")
    if distributor == "local" and requested > per_cpu * cpus:
        raise UsageError("--workers", f"{requested} is more than {per_cpu} for each of this machine's {cpus} CPUs",
                         f"pass at most {per_cpu * cpus} (more would only contend for the CPUs)")
    if requested > C_INT_MAX:
        raise UsageError("--workers", f"{requested} is more than {C_INT_MAX}", f"pass at most {C_INT_MAX}")
    return requested


_signals: list[int] = []  # Ctrl-C and SIGTERM received: recorded by the handler, acted on at a safe point
STOP_POLL = 0.1  # seconds between safe points while waiting (for tasks, for a long call in a thread)


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main: every failure becomes one line on stderr, never a traceback (but with --debug).

    Ctrl-C and SIGTERM are only recorded when they arrive; the run acts on them at its next safe point
    (a progress step, a finished task, a stage). An exception raised by the handler itself could land
    inside any library's critical section (logging's lock, a fork) and hang the process there."""
    debug = "--debug" in sys.argv[1:]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    take_signals()
    try:
        main()
        check_stop()  # a signal that came after the last safe point: the outputs are whole, but say so
        # The run is over and its outputs are closed: the interpreter's exit need not search every object
        # left for reference cycles (0.1 s with matplotlib loaded, 0.25 s with torch). The atexit hooks, the
        # flushing of stdout and stderr and the freeing of everything not in a cycle are unchanged.
        gc.freeze()
    except KeyboardInterrupt:
        _fail(f"interrupted (Ctrl-C): {STOPPED}", SIGNAL_EXIT + signal.SIGINT)
    except Terminated:
        _fail(f"terminated (SIGTERM): {STOPPED}", SIGNAL_EXIT + signal.SIGTERM)
    except Exception as e:
        if debug:
            raise
        if isinstance(e, UsageError):
            _fail(str(e), USAGE_EXIT)
        elif _signals:  # workers ended by the same signal (a SIGTERM to the whole job), seen first
            _fail(f"{'interrupted (Ctrl-C)' if _signals[0] == signal.SIGINT else 'terminated (SIGTERM)'}: {STOPPED}",
                  SIGNAL_EXIT + _signals[0])
        elif isinstance(e, Incomplete):
            _fail(str(e), 1)
        elif isinstance(e, WorkerDied):
            _fail(f"{e}; nothing unfinished was published (rerun the command, with fewer --workers if memory is "
                  "short)", 1)
        elif isinstance(e, BrokenPipeError) and e.filename is None:  # the summary line, to a reader gone
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second complaint as Python exits)
            _fail("stdout: the program reading it has closed it (broken pipe): the summary line could not be written",
                  1)
        elif isinstance(e, OSError):
            _fail(f"{failed_path(e) or 'system'}: {os_error_detail(e)} (check the path, its permissions and free disk "
                  "space)", 1)
        else:  # a bug: still one line
            _fail(f"internal: {type(e).__name__}: {e} (rerun with --debug and report it)", 1)


def failed_path(e: OSError) -> str | None:
    """The file an OSError is about. Of a copy's two (shutil names the source first, the target second), the target
    when the disk is full or the file too large: where space ran out."""
    if e.errno in OUT_OF_SPACE and e.filename2:
        return e.filename2
    return e.filename


def os_error_detail(e: OSError) -> str:
    """What went wrong, in words: the system's, or, for numpy's write cut short on a full disk (an OSError with a
    message but no errno: '<items> requested and <items> written'), what that message means."""
    if e.strerror:
        return e.strerror
    said = str(e.args[0]) if e.args else type(e).__name__
    if short := re.fullmatch(r"(\d+) requested and (\d+) written", said):
        return f"a write stopped short ({short[2]} of {short[1]} items written)"
    return said


def take_signals() -> None:
    """Ctrl-C and SIGTERM to record_signal: as the run starts, and again once a library has taken them over (Ray's
    core, as it connects)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, record_signal)


def record_signal(signum: int, frame: Any) -> None:
    """The handler of Ctrl-C and SIGTERM: it only records them (acted on at the next safe point)."""
    _signals.append(signum)


def signalled() -> bool:
    """Whether Ctrl-C or SIGTERM has arrived (not yet acted on)."""
    return bool(_signals)


def check_stop() -> None:
    """A safe point: raise KeyboardInterrupt or Terminated if Ctrl-C or SIGTERM has arrived."""
    if _signals:
        raise KeyboardInterrupt if _signals[0] == signal.SIGINT else Terminated


def stoppable(func: Callable[..., Any], *args: Any) -> Any:
    """func(*args) in a thread of its own while this one waits, a safe point every STOP_POLL seconds: for a long
    call into a library that lets go of Python meanwhile (faiss's k-means: hours at SemDeDup's k), which no
    signal would otherwise interrupt. Its result, or its exception; when the run stops, the thread is left to end
    with the process."""
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            outcome.append((True, func(*args)))
        except BaseException as e:  # noqa: B036 (raised again in the waiting thread)
            outcome.append((False, e))
    thread = threading.Thread(target=call, name=getattr(func, "__name__", "call"), daemon=True)
    thread.start()
    while True:
        thread.join(STOP_POLL)
        check_stop()
        if not thread.is_alive():
            break
    done, value = outcome[0]
    if not done:
        raise value
    return value


def stage(name: str) -> None:
    """The run reaches a named stage: a safe point, a line in the log, and (for fault-injection tests,
    with DBP_PAUSE_AT=<name>) the process stops itself with SIGSTOP until it is sent SIGCONT."""
    log.info(f"stage: {name}")
    pause_at(name)
    check_stop()


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


class RunLog:
    """The run's log as a file keeps it: what ran (the tool's version and command line), and every message
    of the run with its time, warnings included."""

    def __init__(self):
        self.started, self.text = time.monotonic(), io.StringIO()
        handler = logging.StreamHandler(self.text)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.info(f"density-based-pruning {__version__}: {shlex.join(sys.argv)}")
        log.info(f"in {os.getcwd()}, Python {sys.version.split()[0]}, pid {os.getpid()}")

    def finished(self) -> str:
        """The log, ended with the time the run took."""
        log.info(f"finished after {time.monotonic() - self.started:.1f} s")
        return self.text.getvalue()

    def write(self, path: str, earlier: str = "") -> None:
        """logs.log at `path`: the `earlier` runs' log (a rerun's goes on from it), then this one's, finished."""
        with open(path, "w") as f:
            f.write(earlier + self.finished())


class _Bar(tqdm):
    """A tqdm bar whose every step is a safe point."""

    def update(self, n: float | None = 1) -> bool | None:
        check_stop()
        return super().update(n)


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str = "cluster") -> Iterator[tqdm]:
    """A tqdm bar on stderr, drawn once the work has taken PROGRESS_DELAY seconds (or TQDM_DELAY, tqdm's own
    variable, when set). If the work fails, the bar is wiped on a terminal and ends its line in a log file:
    the error line after it stands alone."""
    delay = {} if "TQDM_DELAY" in os.environ else {"delay": PROGRESS_DELAY}
    bar = _Bar(total=total, desc=desc, unit=unit, file=sys.stderr, **delay)
    try:
        yield bar
    except BaseException:
        bar.leave = not sys.stderr.isatty()
        raise
    finally:
        bar.close()
