"""The errors every step reports as one line: a user mistake, a stop, a run that could not do all of it."""

from __future__ import annotations

import os


class UsageError(Exception):
    """A user mistake: reported as `error: <where>: <what> (<fix>)`, exit status 2."""

    def __init__(self, where: str, what: str = "", fix: str = ""):
        # One positional form (the whole message) keeps the error picklable across workers.
        super().__init__(f"{where}: {what} ({fix})" if what else where)


class LateMistake(UsageError):
    """A user mistake that only finished work could show (a --remove-fraction that the scores show is too large):
    reported as any UsageError, but the work it does not spoil stays staged, for the corrected rerun to use."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that the same rollback runs."""


class Incomplete(Exception):
    """A run that kept what it finished but could not do all of it (shards that cannot be read): its message
    says what is missing and that a rerun does only that; exit status 1."""


class WorkerDied(Exception):
    """A worker process ended without being asked to: killed from outside, typically by the OOM killer."""

    def __init__(self, what: str = "a worker process died, killed from outside (by the out-of-memory killer?)"):
        super().__init__(what)


class MethodError(UsageError):
    """Inputs the method (dbp_utils) cannot work with, in its own words: `param` is the function's parameter
    at fault, and a script that knows which flag set it says so instead (the method names no flag)."""

    def __init__(self, param: str, what: str, fix: str):
        super().__init__(param, what, fix)
        self.param, self.what, self.fix = param, what, fix


def not_a_file(path: str) -> str:
    """Why `path` is not a regular file, in words for an error: it is not there, a folder, or a pipe or device."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a folder"
    return "is not a regular file but a pipe or a device (it is read more than once, by several processes: save it)"
