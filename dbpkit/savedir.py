"""Output folders published whole, one run at a time: the protocol every script writes its outputs by.

A run writes into a hidden staging folder and, when it succeeds, moves its outputs into place, the marker
file last; a run that fails leaves the folder as it was; a stopped resumable run keeps its staged work for a
rerun with the same inputs and flags (one with others is refused rather than let it discard that work, unless
--overwrite). A lock keeps a second run out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

import filelock

from dbpkit.cli import check_stop, signalled
from dbpkit.errors import LateMistake, UsageError
from dbpkit.files import NewFolders, load_json, save_json

STAGING_DIR = ".dbp_staging"  # a save dir's outputs until the run completes
MANIFEST = "manifest.json"  # in the staging folder of a resumable run: what its work there is made from
LOCK_FILE = ".dbp_lock"  # held by the run using a save dir; names it for anyone refused


def check_output_file(path: str | None, flag: str, overwrite: bool, inputs: list[str]) -> None:
    """Refuse an output path that cannot be written, or would replace a file without --overwrite, or one of the
    run's own `inputs` even with it, before any work is done."""
    if not path:
        raise UsageError(flag, "is required", "pass the .npy file to write")
    if os.path.isdir(path):
        raise UsageError(flag, f"{path} is a folder", "pass a file path such as out/dintra.npy")
    if os.path.realpath(path) in {os.path.realpath(p) for p in inputs}:
        raise UsageError(flag, f"{path} is a file this run reads", "choose another path: it would be replaced")
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
    """One run at a time in an output folder: filelock's lock on FOLDER/.dbp_lock (flock: the kernel drops it
    when the process ends, however it ends). The file names the holder for a refused run, and goes with the
    run: the holder removes it before letting go, so whoever opened it meanwhile finds it held, or finds it
    removed (filelock checks that), and no lock file stays behind in the folder."""

    def __init__(self, folder: str, flag: str):
        self.path, self.flag = os.path.join(folder, LOCK_FILE), flag
        self.lock = filelock.FileLock(self.path, timeout=0, on_acquired=_name_holder)

    def acquire(self) -> FolderLock:
        """Take the lock, or raise a UsageError naming the run that holds it."""
        if not os.path.isdir(os.path.dirname(self.path)):  # (filelock would make it again)
            raise UsageError(self.flag, f"{os.path.dirname(self.path)} was removed as this run started",
                             "rerun the command")
        try:
            self.lock.acquire()
        except filelock.Timeout:
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    holder = f.read().strip() or "starting up"
            except FileNotFoundError:
                holder = "ending just now"
            raise UsageError(self.flag, f"{os.path.dirname(self.path)} is in use by another run ({holder})",
                             "wait for it to end, or choose another folder") from None
        return self

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still holding it
        self.lock.release()


def _holds_work(staging: str) -> bool:
    """Whether a staging folder holds a file besides its manifest: a stopped run's work."""
    for folder, _, names in os.walk(staging):
        if any(folder != staging or name != MANIFEST for name in names):
            return True
    return False


def _differences(old: Any, new: dict) -> str:
    """What two runs' `resume` records differ in, as the user knows them: flags and the input files."""
    if not isinstance(old, dict):
        return "inputs or flags (it left no record of them)"
    names = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "flags" and isinstance(old[key], dict) and isinstance(new.get(key), dict):
            names += [f"--{flag}" for flag in sorted(set(old[key]) | set(new[key]))
                      if old[key].get(flag) != new[key].get(flag)]
        else:
            names.append("the input files' content" if key == "files" else f"--{key}")
    return ", ".join(names)


def _name_holder(fd: int) -> None:
    """Write who holds the lock into its file (a killed holder's line may still be there)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}".encode(), 0)


class SaveDir:
    """An output folder published whole. `with SaveDir(path, ...) as out:` writes each output (a file or a
    folder) into a hidden staging folder (`out.path(name)`) and, when the block succeeds, moves them into
    place with the marker file last, the sign of a completed run. A folder holding outputs is refused
    unless `overwrite` (those of a killed run are not: a rerun finishes it). A failed run leaves the folder
    as it was (one it created goes again). A run given `resume` (what its work is made from: inputs,
    flags) keeps its staging folder when it is stopped (not when it fails on bad input, unless a LateMistake,
    which spoils none of it), and a rerun with the same `resume` goes on from it (`out.resumed`); one with
    another is refused, naming what differs, while that work is there (days of embedding, say), or with
    `overwrite` starts afresh; `replace` replaces a completed run's outputs and keeps that rule
    (deduplicate.py's rerun on the inputs it scored). One run at a time
    (FolderLock). A `resume` is a dict of flag values by name, with the inputs' content under "files" and more
    flags under "flags"."""

    def __init__(self, path: str | None, overwrite: bool, outputs: tuple[str, ...], marker: str, flag: str,
                 resume: Any = None, replace: bool = False):
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
        self.resume, self.resumed, self.replace = resume, False, replace
        self._refuse_existing()

    def _refuse_existing(self) -> None:
        if self.overwrite or self.replace:
            return
        if os.path.exists(os.path.join(self.dir, self.marker)):
            raise UsageError(self.flag, f"{self.dir} already holds the outputs of a completed run",
                             f"pass --overwrite to replace them, or choose another {self.flag}")
        found = [name for name in self.outputs if os.path.exists(os.path.join(self.dir, name))]
        if found and not os.path.isdir(self.staging):  # not the leftovers of a killed run of ours
            raise UsageError(self.flag, f"{self.dir} already holds {found[0]}",
                             f"pass --overwrite to replace it, or choose another {self.flag}")

    def add_output(self, name: str) -> None:
        """One more output, known only once the run is under way (published with the others)."""
        self.outputs = (*self.outputs[:-1], name, self.outputs[-1]) if self.outputs[-1] == self.marker else \
            (*self.outputs, name)

    def path(self, name: str) -> str:
        return os.path.join(self.staging, name)

    def __enter__(self) -> SaveDir:
        self.folders = NewFolders(self.dir)
        # Refused here, nothing is undone: the folder, even one this run created, is the other run's now.
        self.lock = FolderLock(self.dir, self.flag).acquire()
        earlier = load_json(self.path(MANIFEST)) if self.resume is not None else None
        self.resumed = self.resume is not None and earlier == self.resume
        if self.resume is not None and not self.resumed and not self.overwrite and _holds_work(self.staging):
            self.lock.release()  # (its work stays as it is, for the run it belongs to)
            raise UsageError(self.flag, f"{self.dir} holds the unfinished work of a stopped run that differs in "
                             f"{_differences(earlier, self.resume)}", "rerun that run's command to finish it, or "
                             "pass --overwrite to discard its work and start afresh")
        try:
            self._refuse_existing()  # again: another run may have completed it since we looked
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
        if exc_type is None and not signalled():
            self._publish()
            self.lock.release()
            return
        if isinstance(exc, OSError):
            exc.filename = exc.filename or self.dir  # a failed write (a full disk) names no file of its own
        if self.resume is not None and (not isinstance(exc, UsageError) or isinstance(exc, LateMistake)):
            self.lock.release()  # the staging folder stays, for a rerun to go on from
        else:
            self._roll_back()
        check_stop()  # a signal that came after the last safe point: not published either

    def _roll_back(self) -> None:
        """Undo this run, still holding the lock so that no other run starts in what is removed."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.folders.remove_created()
        self.lock.release()

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
