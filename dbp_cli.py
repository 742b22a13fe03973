"""Command-line and process plumbing shared by the DBP scripts.

What no script should have to think about: flags under both spellings, user mistakes as one line
and exit status 2, Ctrl-C and SIGTERM acted on at safe points, progress bars, and outputs that appear
whole or not at all (atomic files, and output folders used by one run at a time, published only when
the run is complete). The worker processes that run tasks are dbp_tasks.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

__version__ = "0.4.0"
USAGE_EXIT = 2  # argparse's status for usage errors
SIGNAL_EXIT = 128  # a shell reports death by signal N as 128 + N
PROGRESS_DELAY = 0.5  # seconds before a progress bar is drawn, so a quick error stands alone
PAUSE_VARIABLE = "DBP_PAUSE_AT"  # a stage name: the run stops itself there (fault-injection tests)
PARTIAL_SUFFIX = ".partial"  # a single output file until it is complete
STAGING_DIR = ".dbp_staging"  # a save dir's outputs until the run completes
MANIFEST = "manifest.json"  # in the staging folder of a resumable run: what its work there is made from
LOCK_FILE = ".dbp_lock"  # held by the run using a save dir; names it for anyone refused
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 12  # pages of a file hashed for its fingerprint
STOPPED = "nothing unfinished was published (rerun the same command to run it again, or to finish it)"

log = logging.getLogger("dbp")


# ---------------------------------------------------------------------------------------------
# Errors and flags
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A user mistake: reported as `error: <where>: <what> (<fix>)`, exit status 2."""

    def __init__(self, where: str, what: str = "", fix: str = ""):
        # One positional form (the whole message) keeps the error picklable across workers.
        super().__init__(f"{where}: {what} ({fix})" if what else where)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that the same rollback runs."""


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


def num_workers(requested: int | None) -> int:
    if requested is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested < 1:
        raise UsageError("--workers", f"{requested} is less than 1", "pass 1 or more")
    return requested


# ---------------------------------------------------------------------------------------------
# Running a script: one line per failure, and the exit status says which kind
# ---------------------------------------------------------------------------------------------

_signals: list[int] = []  # Ctrl-C and SIGTERM received: recorded by the handler, acted on at a safe point


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
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, record_signal)
    try:
        main()
        check_stop()  # a signal that came after the last safe point: the outputs are whole, but say so
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
        elif isinstance(e, OSError):
            _fail(f"{e.filename or 'system'}: {e.strerror or e} (check the path, its permissions and free disk "
                  "space)", 1)
        else:  # a bug: still one line
            _fail(f"internal: {type(e).__name__}: {e} (rerun with --debug and report it)", 1)


def record_signal(signum: int, frame: Any) -> None:
    """The handler of Ctrl-C and SIGTERM: it only records them (acted on at the next safe point)."""
    _signals.append(signum)


def check_stop() -> None:
    """A safe point: raise KeyboardInterrupt or Terminated if Ctrl-C or SIGTERM has arrived."""
    if _signals:
        raise KeyboardInterrupt if _signals[0] == signal.SIGINT else Terminated


def stage(name: str) -> None:
    """The run reaches a named stage: a safe point, a line in the log, and (for fault-injection tests,
    with DBP_PAUSE_AT=<name>) the process stops itself with SIGSTOP until it is sent SIGCONT."""
    log.info(f"stage: {name}")
    if os.environ.get(PAUSE_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
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


class Incomplete(Exception):
    """A run that kept what it finished but could not do all of it (shards that cannot be read): its message
    says what is missing and that a rerun does only that; exit status 1."""


class WorkerDied(Exception):
    """A worker process ended without being asked to: killed from outside, typically by the OOM killer."""

    def __init__(self, what: str = "a worker process died, killed from outside (by the out-of-memory killer?)"):
        super().__init__(what)


# ---------------------------------------------------------------------------------------------
# Outputs: whole or not at all, one run per folder
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs: Any) -> Iterator[Any]:
    """Write to `.<name>.partial` beside `path`, renamed into place only once complete (kwargs: open's)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        e.filename = e.filename or path  # a failed write (a full disk) names no file of its own
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_json(path: str, value: Any) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def load_json(path: str) -> Any:
    """The value in a JSON file, or None if there is none (or it is not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def file_fingerprint(path: str) -> str:
    """What a rerun must find unchanged in an input to reuse work made from it: its path, inode and ctime (a
    copy that keeps size and mtime, as `cp -p`, `rsync -a` or a restored backup make, has a new inode or
    ctime; so has a file rewritten in place), its size, and a hash of FINGERPRINT_BLOCKS blocks spread over
    its content and its tail (for file systems whose ctime cannot be trusted)."""
    info = os.stat(path)
    digest = hashlib.sha256(f"{os.path.abspath(path)}\0{info.st_size}\0{info.st_ino}\0{info.st_ctime_ns}".encode())
    with open(path, "rb") as f:
        step = max(FINGERPRINT_BLOCK, info.st_size // FINGERPRINT_BLOCKS)
        for offset in range(0, max(info.st_size, 1), step):
            f.seek(offset)
            digest.update(f.read(FINGERPRINT_BLOCK))
        f.seek(max(info.st_size - FINGERPRINT_BLOCK, 0))
        digest.update(f.read())  # the tail: an appended or truncated end
    return digest.hexdigest()


def files_fingerprint(paths: list[str]) -> str:
    """One digest of many input files' fingerprints (params.json holds this, not one entry per file)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_fingerprint(path).encode())
    return "sha256:" + digest.hexdigest()


def read_text(path: str) -> str:
    """A text file's content, or "" if there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class _NewFolders:
    """`path` and its missing parents, created; `remove_created()` and `restore_times()` (which gives the
    folder that was there its timestamps back) undo that, so a failed run leaves the tree as it found it."""

    def __init__(self, path: str):
        self.created, self.existing = None, os.path.abspath(path)
        while not os.path.exists(self.existing):
            self.created, self.existing = self.existing, os.path.dirname(self.existing)
        self.times = os.stat(self.existing)
        os.makedirs(path, exist_ok=True)

    def remove_created(self) -> None:
        if self.created:
            shutil.rmtree(self.created, ignore_errors=True)

    def restore_times(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.existing, ns=(self.times.st_atime_ns, self.times.st_mtime_ns))


def save_npy(path: str, array: Any) -> None:
    """np.save, atomically, creating the folders it needs (and removing them again if it fails)."""
    import numpy as np

    folders = _NewFolders(os.path.dirname(os.path.abspath(path)))
    try:
        with atomic_open(path) as f:
            np.save(f, array)
    except BaseException:
        folders.remove_created()
        folders.restore_times()
        raise


def check_output_file(path: str | None, flag: str, overwrite: bool) -> None:
    """Refuse an output path that cannot be written, or would replace a file without --overwrite, before any
    work is done."""
    if not path:
        raise UsageError(flag, "is required", "pass the .npy file to write")
    if os.path.isdir(path):
        raise UsageError(flag, f"{path} is a folder", "pass a file path such as out/dintra.npy")
    if os.path.exists(path) and not overwrite:
        raise UsageError(flag, f"{path} already exists", "pass --overwrite to replace it, or choose another path")
    check_creatable(os.path.dirname(os.path.abspath(path)), flag)


def check_creatable(folder: str, flag: str) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is a writable folder."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(flag, f"{probe} is a file, so {folder} cannot be created", "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(flag, f"{probe} is not writable", "choose a path you can write to")


class FolderLock:
    """One run at a time in an output folder: a POSIX record lock on FOLDER/.dbp_lock. The kernel drops it
    when the process ends, however it ends, and forked workers never inherit it. The file names the
    holder for a refused run."""

    def __init__(self, folder: str, flag: str):
        self.path, self.flag, self.fd = os.path.join(folder, LOCK_FILE), flag, -1

    def acquire(self) -> FolderLock:
        """Take the lock, or raise a UsageError naming the run that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                raise UsageError(self.flag, f"{os.path.dirname(self.path)} was removed as this run started",
                                 "rerun the command") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "starting up"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UsageError(self.flag, f"{os.path.dirname(self.path)} is in use by another run ({holder})",
                                 "wait for it to end, or choose another folder") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # still the file in the folder, not one its last holder removed as we opened it
            os.close(fd)
        self.fd = fd
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)  # a killed holder's line may still be there
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}".encode())
        return self

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still holding it: whoever opened this file finds it held
        os.close(self.fd)


class SaveDir:
    """An output folder published whole. `with SaveDir(path, ...) as out:` writes each output (a file or a
    folder) into a hidden staging folder (`out.path(name)`) and, when the block succeeds, moves them into
    place with the marker file last, the sign of a completed run. A folder holding outputs is refused
    unless `overwrite` (those of a killed run are not: a rerun finishes it). A failed run leaves the folder
    as it was (one it created goes again). A run given `resume` (what its work is made from: inputs,
    flags) keeps its staging folder when it is stopped (not when it fails on bad input), and a rerun with
    the same `resume` goes on from it (`out.resumed`); with another, it starts afresh. One run at a time
    (FolderLock)."""

    def __init__(self, path: str | None, overwrite: bool, outputs: tuple[str, ...], marker: str, flag: str,
                 resume: Any = None):
        if not path:
            raise UsageError(flag, "is required", "pass the folder for the outputs")
        if os.path.islink(path) and not os.path.exists(path):
            raise UsageError(flag, f"{path} is a symbolic link to {os.readlink(path)}, which does not exist",
                             "create the folder it points to, or choose another folder")
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(flag, f"{path} is a file", "pass a folder")
        check_creatable(os.path.abspath(path), flag)
        self.dir, self.staging = path, os.path.join(path, STAGING_DIR)
        self.overwrite, self.outputs, self.marker, self.flag = overwrite, outputs, marker, flag
        self.resume, self.resumed = resume, False
        self._refuse_existing()

    def _refuse_existing(self) -> None:
        if self.overwrite:
            return
        if os.path.exists(os.path.join(self.dir, self.marker)):
            raise UsageError(self.flag, f"{self.dir} already holds the outputs of a completed run",
                             f"pass --overwrite to replace them, or choose another {self.flag}")
        found = [name for name in self.outputs if os.path.exists(os.path.join(self.dir, name))]
        if found and not os.path.isdir(self.staging):  # not the leftovers of a killed run of ours
            raise UsageError(self.flag, f"{self.dir} already holds {found[0]}",
                             f"pass --overwrite to replace it, or choose another {self.flag}")

    def path(self, name: str) -> str:
        return os.path.join(self.staging, name)

    def __enter__(self) -> SaveDir:
        self.folders = _NewFolders(self.dir)
        # Refused here, nothing is undone: the folder, even one this run created, is the other run's now.
        self.lock = FolderLock(self.dir, self.flag).acquire()
        try:
            self._refuse_existing()  # again: another run may have completed it since we looked
            self.resumed = self.resume is not None and load_json(self.path(MANIFEST)) == self.resume
            if not self.resumed:
                shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left, or another run's work
            os.makedirs(self.staging, exist_ok=True)
            if self.resume is not None:
                save_json(self.path(MANIFEST), self.resume)
        except BaseException:
            self._roll_back()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not _signals:
            self._publish()
            self.lock.release()
            return
        if isinstance(exc, OSError):
            exc.filename = exc.filename or self.dir  # a failed write (a full disk) names no file of its own
        if self.resume is not None and not isinstance(exc, UsageError):
            self.lock.release()  # the staging folder stays, for a rerun to go on from
        else:
            self._roll_back()
        check_stop()  # a signal that came after the last safe point: not published either

    def _roll_back(self) -> None:
        """Undo this run, still holding the lock so that no other run starts in what is removed."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.folders.remove_created()
        self.lock.release()
        self.folders.restore_times()  # last: removing the lock file touched them

    def _publish(self) -> None:
        """Move the outputs into place: first every earlier output aside (whatever its kind: a file where a
        folder goes is no obstacle), the marker first, so the folder is marked incomplete from here on;
        then the new outputs, the marker last."""
        written = set(os.listdir(self.staging))
        aside = tempfile.mkdtemp(prefix=".replaced", dir=self.staging)
        for name in sorted(self.outputs, key=lambda name: name != self.marker):
            if os.path.lexists(target := os.path.join(self.dir, name)):
                os.replace(target, os.path.join(aside, name))  # goes with the staging folder
        for name in self.outputs:
            if name in written and name != self.marker:
                os.replace(self.path(name), os.path.join(self.dir, name))
        os.replace(self.path(self.marker), os.path.join(self.dir, self.marker))
        shutil.rmtree(self.staging)
