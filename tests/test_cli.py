"""The plumbing: tasks keep their order and pass errors on, and a failed bar ends its line."""

import multiprocessing
import os

import pytest

from dbpkit import cli, errors, tasks


def square_or_fail(x):
    if x == 13:
        raise errors.UsageError("item 13", "is unlucky", "skip it")
    return x * x, os.getpid()


def test_pool_results_come_in_order_from_several_workers():
    with tasks.TaskPool(3) as pool:
        results = list(pool.run(square_or_fail, list(range(12)), "squares"))
    assert [r for r, _ in results] == [x * x for x in range(12)]
    assert os.getpid() not in {pid for _, pid in results}


def test_a_workers_error_reaches_the_caller_and_stops_the_pool():
    with pytest.raises(errors.UsageError, match="item 13: is unlucky"):
        with tasks.TaskPool(2) as pool:
            list(pool.run(square_or_fail, list(range(40)), "squares"))
    assert multiprocessing.active_children() == []  # stopped and reaped, not left to finish


def test_a_failed_bar_ends_its_line_in_a_log_file(monkeypatch, capsys):
    """stderr to a file: what is printed after a failure (the error line) starts on a line of its own."""
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0)
    with pytest.raises(errors.UsageError):
        list(tasks.TaskPool(1).run(square_or_fail, list(range(20)), "squares"))
    err = capsys.readouterr().err
    assert "squares:" in err and err.endswith("\n")
