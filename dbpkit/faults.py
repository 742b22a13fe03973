"""Fault injection, for the tests that kill, stop or interrupt a run at a chosen point: all of it here.

With DBP_PAUSE_AT=<stage> a run stops itself (SIGSTOP) when it reaches that named stage, until it is sent
SIGCONT; with DBP_PAUSE_AT="task <function> <marker file>" the first task of that function to start writes
its pid to the marker file and stops itself (a task run again after it is killed finds the marker and goes
on). The tests wait for those events instead of for time to pass. Unset, nothing here does anything.
"""

from __future__ import annotations

import contextlib
import os
import signal

PAUSE_VARIABLE = "DBP_PAUSE_AT"


def pause_at(stage: str) -> None:
    """At a named stage: stop here if DBP_PAUSE_AT names it."""
    if os.environ.get(PAUSE_VARIABLE) == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


def pause_task(function: str) -> None:
    """At the start of a task of `function`: stop the first one if DBP_PAUSE_AT says "task <function> <marker>"."""
    pause = os.environ.get(PAUSE_VARIABLE, "")
    if pause.startswith("task ") and pause.split(" ", 2)[1] == function:
        with contextlib.suppress(FileExistsError):
            fd = os.open(pause.split(" ", 2)[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGSTOP)


def passed_on() -> dict[str, str]:
    """The fault-injection variables set here, for the workers of a cluster (which do not inherit them)."""
    return {name: os.environ[name] for name in (PAUSE_VARIABLE,) if name in os.environ}
