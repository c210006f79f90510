"""gevent and eventlet workers: one real OS thread runs every task-table statement of the
process (``db.on_statement_thread``), so the process holds one connection of ours whatever
the number of greenlets (Django's connections are per greenlet there)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_green: str | None = None


def green_pool() -> str:
    """``"gevent"`` or ``"eventlet"`` when this process's threading is monkey-patched by it
    (Celery's ``-P gevent`` / ``-P eventlet`` patch before anything else runs), else ``""``."""
    global _green
    if _green is None:
        _green = _detect_green_pool()
    return _green


def _detect_green_pool() -> str:
    if "gevent" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            return "gevent"
    if "eventlet" in sys.modules:
        from eventlet import patcher

        if patcher.is_monkey_patched("thread"):
            return "eventlet"
    return ""


def _real_get_ident() -> int:
    """The OS thread's id (the patched ``threading.get_ident`` names a greenlet)."""
    if green_pool() == "gevent":
        from gevent import monkey

        return monkey.get_original("_thread", "get_ident")()
    from eventlet import patcher

    return patcher.original("_thread").get_ident()


class StatementRunner:
    """One real OS thread that runs every task-table statement of a green process, so the
    process holds one connection of ours whatever the number of greenlets. The calling
    greenlet waits cooperatively (other greenlets run meanwhile, as they would while it
    waits for a socket): gevent's own ``ThreadPool(1)``; under eventlet a thread of its
    ``tpool`` hands the call to the runner and waits for it."""

    def __init__(self) -> None:
        self.ident: int | None = None
        if green_pool() == "gevent":
            from gevent.threadpool import ThreadPool

            self._pool = ThreadPool(1)
            self._pool.apply(self._mark)
        else:
            from eventlet import patcher

            threads = patcher.original("threading")
            self._event = threads.Event
            self._jobs = patcher.original("queue").SimpleQueue()
            started = threads.Event()
            threads.Thread(
                target=self._loop, args=(started,), name="fulldb-statements", daemon=True
            ).start()
            started.wait()

    def _mark(self) -> None:
        self.ident = _real_get_ident()

    def _loop(self, started: Any) -> None:
        self._mark()
        started.set()
        while True:
            operation, done, outcome = self._jobs.get()
            try:
                outcome.append((True, operation()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome.append((False, exc))
            done.set()

    def _hand_over(self, operation: Callable[[], T]) -> T:
        done, outcome = self._event(), []
        self._jobs.put((operation, done, outcome))
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def call(self, operation: Callable[[], T]) -> T:
        if green_pool() == "gevent":
            return self._pool.apply(operation)
        from eventlet import tpool

        return tpool.execute(self._hand_over, operation)


_runner: StatementRunner | None = None
_runner_lock = threading.Lock()


def statement_runner() -> StatementRunner:
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = StatementRunner()
        return _runner


def on_statement_runner() -> bool:
    runner = _runner
    return runner is not None and runner.ident == _real_get_ident()
