"""Waiting for results: ``AsyncResult.get()`` pushed (LISTEN/NOTIFY) vs polled vs Redis.

RabbitMQ + PostgreSQL, in a database, a queue, a var dir and a Redis database of their own
(``fulldb_bench_wait``, ``bench_wait``, ``/tmp/fulldb-bench-wait``,
``redis://127.0.0.1:6379/11``). Three waiting modes, each in a child process of this script
that starts its own worker (``celery -A testproject worker -P prefork -c 2 -Q bench_wait``,
which imports this module for its task):

* ``push``: ours as configured by default (``RESULT_PUSH``: the trigger notifies, ``get()``
  waits on the process's listening session);
* ``poll``: ours with ``DJANGO_CELERY_FULLDBRESULT_RESULT_PUSH = False`` in the waiting
  process: Celery's synchronous wait, one read every 0.5 s (the baseline, what waiting was
  before push);
* ``redis``: the anchor, Celery's Redis result backend (``CELERY_RESULT_BACKEND`` set for the
  worker and the waiting process), same broker, same task, same worker.

Measured:

1. Lag: ``--samples`` (200) tasks ``wait_bench.timed_sleep`` that each sleep a random 20-80
   ms (the same seeded sequence in every mode) and return ``time.time()`` read right before
   returning; the lag of a sample is the waiting process's ``time.time()`` when ``get()``
   returned minus that value. It covers what is between the task's end and its caller:
   the worker's store of the result (any backend's), the notification or the next poll, the
   read, the decoding. ``date_done`` (ours: the worker's clock before its write; Redis: the
   same, in the stored meta) gives a second figure without the store itself. One waiter
   (publish, ``get()``, next) and ``--threads`` (8) threads of the same process waiting at
   once (``--samples`` in all, each thread its share), p50/p99/mean/max. Each thread has the
   backend instance Celery gives it (a thread's own: ``result_backend_thread_safe`` is off),
   so with push each thread listens on a session of its own: their number is reported.
2. Statements the waiting process sends to PostgreSQL while it waits on a 2 s task (ours,
   push and poll): every ``execute`` of psycopg's cursors in the process (the package's
   connection, Django's health checks and the listening session alike) counted from the
   moment ``get()`` is called until it returns, the publish's own PENDING row written before
   (``publish.flush()``); the package's connection cross-checked with Django's
   ``CaptureQueriesContext``. Twice: the first wait (the listening session opened by it)
   and the next one (the session listens already).
3. The write path's cost of push, in this (parent) process with no worker running:
   ``--write-tasks`` (300) tasks x 3 ``backend.store_result`` writes (PENDING, STARTED,
   SUCCESS: ``stores.drive``) with no session registered in ``fulldbresult_listener`` (the
   trigger probes an empty table), with one session registered (a separate connection that
   ``LISTEN``s and ``REGISTER``s: each STARTED and SUCCESS write notifies) and with the
   trigger disabled (what the table costs without push at all). ``--write-rounds`` (10)
   rounds, each of the three in rotating order one after the other: short rounds side by
   side, because other jobs on the machine move writes/s by more than what is measured. The
   ratios are the median of each round's ratio; writes/s the median of the rounds. The
   notifications the listening connection received are counted per round (2 per task
   registered, none otherwise).

Each worker runs in its own session and is stopped with SIGTERM in a ``finally`` (Ctrl-C
and SIGTERM included), its pool killed after 15 s; a worker left by a killed run is stopped
at the next start (pid file in the var dir). Logs: ``/tmp/fulldb-bench-wait/worker-<mode>.log``.

    python bench/wait_bench.py [--quick] [--samples 200] [--threads 8] [--write-tasks 300]
        [--write-rounds 10] [--modes push,poll,redis] [--no-write-path] [--json-out FILE]

``--quick``: 40 samples, 3 write rounds of 200 tasks (about 70 s; the full run about 4 min).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

_common.reexec_in_venv()

from celery import shared_task  # noqa: E402

DB_NAME = "fulldb_bench_wait"
QUEUE = "bench_wait"
VAR_DIR = Path("/tmp/fulldb-bench-wait")
REDIS_URL = "redis://127.0.0.1:6379/11"
NODE_PREFIX = "fulldb-bench-wait"
PIDFILE = VAR_DIR / "worker.pid"
TASK_NAME = "wait_bench.timed_sleep"
WORKER_START_TIMEOUT = 90.0
GET_TIMEOUT = 30.0
MODES = ("push", "poll", "redis")
LABELS = {
    "push": "ours, push (default)",
    "poll": "ours, RESULT_PUSH=False (polling)",
    "redis": "Celery's Redis result backend",
}
#: Sleep of the lag samples, seconds (uniform), and of the statement count's task.
SLEEP_RANGE = (0.02, 0.08)
LONG_TASK = 2.0
SEED = 20261202


@shared_task(name=TASK_NAME)
def timed_sleep(seconds: float) -> dict[str, float]:
    """Sleep, then return the wall clock read right before returning: the waiter's lag is
    measured from the moment the result exists in the worker, whatever a backend stores as
    ``date_done`` and whenever it computes it."""
    time.sleep(seconds)
    return {"slept": seconds, "done": time.time()}


def mode_env(mode: str) -> dict[str, str]:
    """The environment of a mode's child and of its worker (which imports this module)."""
    env = _common.bench_env(DB_NAME, QUEUE, str(VAR_DIR), FULLDB_BACKEND="fulldb")
    if mode == "redis":
        # Celery reads it before the project's settings (celery.app.utils.Settings).
        env["CELERY_RESULT_BACKEND"] = REDIS_URL
    path = [p for p in env["PYTHONPATH"].split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*path, str(BENCH)]))
    return env


class Worker(_common.WorkerProcess):
    def __init__(self, mode: str, log_path: Path) -> None:
        self.node = f"{NODE_PREFIX}-{os.getpid()}@127.0.0.1"
        super().__init__(worker_command(self.node), mode_env(mode), log_path, PIDFILE)


def worker_command(node: str) -> list[str]:
    return _common.worker_command(QUEUE, node, 2, "--include", "wait_bench")


# -- counting statements ---------------------------------------------------------------


class PsycopgCounter:
    """Every statement this process sends through psycopg while ``active``: a wrapper of
    ``psycopg.Cursor.execute``/``executemany``, under Django's cursors, its health checks
    (``Connection.execute``) and the listening session's raw cursor alike (Django's own
    execute wrappers do not see that session: it is a driver connection, not a wrapper)."""

    def __init__(self) -> None:
        self.active = False
        #: (server pid of the session, the statement's first 120 characters, thread name)
        self.calls: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()

    def install(self) -> None:
        import psycopg

        counter = self
        for name in ("execute", "executemany"):
            original = getattr(psycopg.Cursor, name)

            def wrapped(cursor: Any, query: Any, *args: Any, _original: Any = original, **kw: Any):
                if counter.active:
                    text = query if isinstance(query, str) else type(query).__name__
                    call = (
                        cursor.connection.info.backend_pid,
                        text[:120],
                        threading.current_thread().name,
                    )
                    with counter._lock:
                        counter.calls.append(call)
                return _original(cursor, query, *args, **kw)

            setattr(psycopg.Cursor, name, wrapped)

    @contextlib.contextmanager
    def counting(self):
        self.calls = []
        self.active = True
        try:
            yield self.calls
        finally:
            self.active = False


COUNTER = PsycopgCounter()


# -- the child of one mode ---------------------------------------------------------------


def purge_queue(app: Any) -> int:
    queue = app.amqp.queues[QUEUE]
    with app.connection_for_write() as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        return bound.purge() or 0


def listeners() -> int:
    from django.db import connection

    from django_celery_fulldbresult.push import sql

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {sql.LISTENERS}")
        return cursor.fetchone()[0]


def seconds_of(value: Any) -> float | None:
    """``date_done`` as epoch seconds (a datetime, or the ISO string of some backends)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def sample(seconds: float, worker: Worker) -> dict[str, float]:
    """Publish one task, wait for it; the lags in ms (from the task's return and from
    ``date_done``)."""
    result = timed_sleep.apply_async((seconds,))
    try:
        value = result.get(timeout=GET_TIMEOUT)
    except Exception:
        worker.check()
        raise
    returned = time.time()
    # After the clock is read: a backend that does not keep the meta reads it here.
    done = seconds_of(result.date_done)
    return {
        "lag_ms": (returned - value["done"]) * 1000,
        "date_done_lag_ms": (returned - done) * 1000 if done is not None else float("nan"),
    }


def stats(samples: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    lags = sorted(s["lag_ms"] for s in samples)
    done = sorted(s["date_done_lag_ms"] for s in samples)
    return {
        "samples": len(lags),
        "p50_ms": _common.percentile(lags, 50),
        "p99_ms": _common.percentile(lags, 99),
        "mean_ms": sum(lags) / len(lags) if lags else float("nan"),
        "max_ms": lags[-1] if lags else float("nan"),
        "date_done_p50_ms": _common.percentile(done, 50),
        "date_done_p99_ms": _common.percentile(done, 99),
        "seconds": seconds,
    }


def sequential(durations: list[float], worker: Worker) -> dict[str, Any]:
    started = time.monotonic()
    samples = [sample(seconds, worker) for seconds in durations]
    return stats(samples, time.monotonic() - started)


def threaded(durations: list[float], threads: int, worker: Worker) -> dict[str, Any]:
    """``threads`` threads of this process, each publishing and waiting on its share of
    ``durations`` one after the other, all started at once."""
    samples: list[dict[str, float]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def run(share: list[float]) -> None:
        try:
            barrier.wait(30)
            for seconds in share:
                samples.append(sample(seconds, worker))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [
        threading.Thread(target=run, args=(durations[i::threads],), name=f"waiter-{i}")
        for i in range(threads)
    ]
    started = time.monotonic()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(GET_TIMEOUT * len(durations))
    seconds = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{len(errors)} waiting thread(s) failed: {errors[0]!r}") from errors[0]
    return stats(samples, seconds)


def statements_per_wait(app: Any, worker: Worker) -> dict[str, dict[str, Any]]:
    """The statements of ``get()`` on a ``LONG_TASK`` s task: the first wait (without a
    listening session) and the next."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from django_celery_fulldbresult import db, publish
    from django_celery_fulldbresult.push import consumer as push_consumer

    consumer = app.backend.result_consumer
    out: dict[str, dict[str, Any]] = {}
    for label in ("first", "next"):
        if label == "first":
            consumer.stop()  # no listening session: the wait opens it (push)
        result = timed_sleep.apply_async((LONG_TASK,))
        publish.flush()  # the publish's PENDING row (written by a thread) is not the wait's
        package = connections[db.write_alias()]
        with CaptureQueriesContext(package) as captured, COUNTER.counting() as calls:
            try:
                result.get(timeout=GET_TIMEOUT)
            except Exception:
                worker.check()
                raise
        listener = push_consumer.hub().current()  # the process's one session
        session = listener.raw if listener is not None else None
        listening = session.info.backend_pid if session is not None else None
        own = package.connection.info.backend_pid if package.connection is not None else None
        sessions = {listening: "listening", own: "package"}
        out[label] = {
            "statements": len(calls),
            "package_connection": len(captured),
            "listening_session": sum(1 for pid, _, _ in calls if pid == listening),
            # In order: "<session>: <statement kind>".
            "kinds": [f"{sessions.get(pid, 'other')}: {kind(text)}" for pid, text, _ in calls],
            "calls": calls,
        }
        print(f"  statements, {label} wait: {out[label]}", file=sys.stderr)
    return out


def kind(statement: str) -> str:
    """A statement's first word (``pg_notify`` named: a SELECT that notifies)."""
    if "pg_notify" in statement:
        return "pg_notify"
    first = statement.split(None, 1)[0].upper() if statement.strip() else "?"
    return f"{first} row" if first == "SELECT" and "taskresultmeta" in statement else first


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """In the child process of ``mode``: worker, lags, statements."""
    # setup() drops an inherited CELERY_RESULT_BACKEND: the mode's own is passed on.
    redis_env = {"CELERY_RESULT_BACKEND": REDIS_URL} if mode == "redis" else {}
    _common.setup(DB_NAME, migrate=False, queue=QUEUE, var_dir=str(VAR_DIR), **redis_env)

    from testproject.celery_app import app

    _common.set_setting("RESULT_PUSH", mode != "poll")
    # Publish tracking (a PENDING row per task, written behind by a thread) is the
    # testproject's setting for ours; with the Redis backend nothing is tracked.
    _common.set_setting("TRACK_PUBLISH", mode != "redis")
    backend = app.backend
    expected = "RedisBackend" if mode == "redis" else "DatabaseResultBackend"
    if type(backend).__name__ != expected:
        raise SystemExit(f"{mode}: the result backend is {type(backend).__name__}, not {expected}")
    if mode != "redis" and backend.is_async != (mode == "push"):
        raise SystemExit(f"{mode}: backend.is_async is {backend.is_async}")
    if mode == "redis":
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
    COUNTER.install()
    _common.reap_leftover_worker(PIDFILE, NODE_PREFIX)
    purged = purge_queue(app)
    rng = random.Random(SEED)
    durations = [rng.uniform(*SLEEP_RANGE) for _ in range(args.samples)]
    log_path = VAR_DIR / f"worker-{mode}.log"
    worker = Worker(mode, log_path)
    out: dict[str, Any] = {"mode": mode, "label": LABELS[mode], "purged_before": purged}
    try:
        worker.start()
        # Warm-up: the worker is up, both pool processes have run tasks, the waiting side
        # is set up (push: the listening session is open).
        timed_sleep.apply_async((0.0,)).get(timeout=WORKER_START_TIMEOUT)
        for _ in range(3):
            pending = [timed_sleep.apply_async((0.05,)) for _ in range(4)]
            for result in pending:
                result.get(timeout=GET_TIMEOUT)
        out["sequential"] = sequential(durations, worker)
        print(f"  {mode} sequential: {out['sequential']}", file=sys.stderr)
        out["threads"] = threaded(durations, args.threads, worker)
        out["threads"]["threads"] = args.threads
        print(f"  {mode} {args.threads} threads: {out['threads']}", file=sys.stderr)
        if mode != "redis":
            # Push: one session for the whole process, its threads included.
            out["listener_sessions"] = listeners()
            out["statements"] = statements_per_wait(app, worker)
    finally:
        with contextlib.suppress(Exception):
            backend.result_consumer.stop()
        out["worker_exit_code"] = worker.stop()
        if mode == "redis":
            with contextlib.suppress(Exception):
                import redis

                redis.Redis.from_url(REDIS_URL).flushdb()
    out["worker_log"] = str(log_path)
    return out


def run_child(mode: str, argv: list[str]) -> dict[str, Any] | None:
    out = VAR_DIR / f"child-{mode}.json"
    return _common.run_child("wait", str(Path(__file__).resolve()), argv, mode, out, mode_env(mode))


# -- the write path's cost of push (the parent, no worker running) -----------------------


def set_trigger(enabled: bool) -> None:
    from django.db import connection

    from django_celery_fulldbresult.push import sql

    action = "ENABLE" if enabled else "DISABLE"
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {_common.TASK_TABLE} {action} TRIGGER {sql.TRIGGER}")


def drain(conn: Any) -> int:
    """The notifications a listening connection has received (until 0.2 s of silence)."""
    heard = 0
    while True:
        batch = sum(1 for _ in conn.notifies(timeout=0.2))
        if not batch:
            return heard
        heard += batch


def write_path(app: Any, tasks: int, rounds: int, warmup: int) -> dict[str, Any]:
    import psycopg
    import stores

    from django_celery_fulldbresult.push import sql
    from django_celery_fulldbresult.result_backends import DatabaseResultBackend

    backend = DatabaseResultBackend(app=app)

    def store(task_id: str, result: Any, state: str, request: Any) -> None:
        backend.store_result(task_id, result, state, request=request)

    modes = ("none registered", "one registered", "trigger disabled")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    listener = psycopg.connect(dbname=DB_NAME, autocommit=True, connect_timeout=10, **_common.PG)
    try:
        listener.execute(sql.PRUNE)  # registrations of sessions that are gone
        others = listener.execute(f"SELECT COUNT(*) FROM {sql.LISTENERS}").fetchone()[0]
        listener.execute(sql.LISTEN)

        def one(mode: str, count: int) -> dict[str, Any]:
            _common.truncate(_common.TASK_TABLE)
            if mode == "one registered":
                listener.execute(sql.REGISTER)
            elif mode == "trigger disabled":
                set_trigger(False)
            try:
                run = stores.drive(store, count)
            finally:
                if mode == "one registered":
                    listener.execute(sql.UNREGISTER)
                elif mode == "trigger disabled":
                    set_trigger(True)
            run["notifications"] = drain(listener)
            return run

        for mode in modes:  # connections, statement caches, the trigger's plan
            one(mode, warmup)
        for index in range(rounds):
            order = modes[index % len(modes) :] + modes[: index % len(modes)]
            for mode in order:
                run = one(mode, tasks)
                runs[mode].append(run)
                print(
                    f"  write path, {mode}: {run['writes_per_s']:,.0f} writes/s "
                    f"({run['notifications']} notifications)",
                    file=sys.stderr,
                )
    finally:
        with contextlib.suppress(Exception):
            listener.execute(sql.UNREGISTER)
        listener.close()
        set_trigger(True)
        _common.truncate(_common.TASK_TABLE)
    summary = {
        mode: {
            "writes_per_s": _common.median(r["writes_per_s"] for r in results),
            "p50_ms": _common.median(r["p50_ms"] for r in results),
            "p99_ms": _common.median(r["p99_ms"] for r in results),
            "runs_writes_per_s": [round(r["writes_per_s"], 1) for r in results],
            "notifications": [r["notifications"] for r in results],
        }
        for mode, results in runs.items()
    }

    def ratios(mode: str, base: str) -> list[float]:
        """Each round's ratio (the modes of a round ran one after the other)."""
        pairs = zip(runs[mode], runs[base], strict=True)
        return [round(a["writes_per_s"] / b["writes_per_s"], 3) for a, b in pairs]

    none = summary["none registered"]["writes_per_s"]
    return {
        "tasks": tasks,
        "rounds": rounds,
        "other_sessions_registered": others,
        "summary": summary,
        # One session registered / none registered: what waiters cost the writers.
        "ratio": _common.median(ratios("one registered", "none registered")),
        "ratios": ratios("one registered", "none registered"),
        "ratio_of_medians": summary["one registered"]["writes_per_s"] / none,
        # None registered / trigger disabled: what the trigger's probe costs when nobody waits.
        "trigger_ratio": _common.median(ratios("none registered", "trigger disabled")),
        "trigger_ratios": ratios("none registered", "trigger disabled"),
    }


# -- report ------------------------------------------------------------------------------


def sections(results: dict[str, dict], writes: dict | None, args: argparse.Namespace) -> list:
    out: list[dict[str, Any]] = []
    rows = []
    for result in results.values():
        for kind, label in (("sequential", "1 waiter"), ("threads", f"{args.threads} threads")):
            s = result[kind]
            rows.append(
                [
                    result["label"],
                    label,
                    str(s["samples"]),
                    f"{s['p50_ms']:.1f}",
                    f"{s['p99_ms']:.1f}",
                    f"{s['mean_ms']:.1f}",
                    f"{s['max_ms']:.1f}",
                    f"{s['date_done_p50_ms']:.1f} / {s['date_done_p99_ms']:.1f}",
                ]
            )
    push, poll, redis = (results.get(m) for m in MODES)
    notes = [
        "lag: `time.time()` in the waiting process when `get()` returned, minus the "
        "`time.time()` the task read right before returning (same machine, same clock): the "
        "worker's store of the result, the notification or the poll, the read and the "
        "decoding",
        "polling: `get()` reads at once (not done yet), then every 0.5 s: a task shorter "
        "than that is seen 0.5 s after the call, its lag about 500 ms minus its run time",
        "from date_done: the same end, from the `date_done` of the stored result (the "
        "worker's clock before it writes it): the store itself not included",
        f"tasks: `{TASK_NAME}` sleeping a random {SLEEP_RANGE[0] * 1000:.0f}-"
        f"{SLEEP_RANGE[1] * 1000:.0f} ms (seed {SEED}, the same sequence in every mode); "
        "1 waiter: publish, `get()`, next; threads: each thread of the same process "
        "publishes and waits on its share, all at once",
        "worker: `" + " ".join(worker_command(f"{NODE_PREFIX}-PID@127.0.0.1")[1:]) + "` "
        "(`CELERY_DB_REUSE_MAX=1000`); Redis: `CELERY_RESULT_BACKEND=" + REDIS_URL + "` for "
        "the worker and the waiting process, RabbitMQ as broker",
        "ours publishes with publish tracking on (the testproject's setting: a PENDING row "
        "written behind by a thread); the Redis mode without it",
    ]
    if push and poll:
        ratio = poll["sequential"]["p50_ms"] / push["sequential"]["p50_ms"]
        notes.append(f"p50 lag, 1 waiter: polling / push = **{ratio:.1f}x**")
    if push and redis:
        ratio = redis["sequential"]["p50_ms"] / push["sequential"]["p50_ms"]
        notes.append(f"p50 lag, 1 waiter: Redis / push = **{ratio:.2f}x**")
    if push and "listener_sessions" in push:
        notes.append(
            f"push: {push['listener_sessions']} listening session(s) registered by the waiting "
            f"process after its main thread and its {args.threads} threads waited (Celery gives "
            "each thread a backend of its own unless `result_backend_thread_safe`, and each "
            "backend has its consumer and its session)"
        )
    out.append(
        {
            "title": (
                f"get() lag after the task returns ({args.samples} tasks, prefork -c 2, "
                "RabbitMQ + PostgreSQL / Redis)"
            ),
            "headers": [
                "mode",
                "waiters",
                "samples",
                "p50 ms",
                "p99 ms",
                "mean ms",
                "max ms",
                "from date_done p50 / p99 ms",
            ],
            "rows": rows,
            "notes": notes,
        }
    )
    rows = []
    for mode in ("push", "poll"):
        result = results.get(mode)
        if not result or "statements" not in result:
            continue
        for label, wait in (
            ("first (session opened by the wait)", "first"),
            ("next (session listening)", "next"),
        ):
            s = result["statements"][wait]
            rows.append(
                [
                    result["label"],
                    label if mode == "push" else wait,
                    str(s["statements"]),
                    str(s["package_connection"]),
                    str(s["listening_session"]),
                    ", ".join(s["kinds"]),
                ]
            )
    if rows:
        out.append(
            {
                "title": f"Statements sent to PostgreSQL while waiting on a {LONG_TASK:g} s task",
                "headers": [
                    "mode",
                    "wait",
                    "statements (all, psycopg)",
                    "package connection (CaptureQueriesContext)",
                    "listening session",
                    "kinds",
                ],
                "rows": rows,
                "notes": [
                    "all: every `execute`/`executemany` of psycopg's cursors in the waiting "
                    "process from the call of `get()` until it returns (the publish's PENDING "
                    "row written before: `publish.flush()`); Django's health checks included",
                    "first: the consumer's session closed before (`result_consumer.stop()`), "
                    "as in a process that waits for the first time (or 30 s after its last "
                    "wait); next: the session left open by the first",
                    "kinds, in order: the session (`package`: the package's connection of the "
                    "waiting thread; `listening`: the consumer's LISTEN session) and the "
                    "statement (`SELECT row`: a read of the task table; DELETE/INSERT/LISTEN: "
                    "the session's prune, register and listen; `pg_notify`: a notification "
                    "the session sends itself); polling reads every 0.5 s",
                ],
            }
        )
    if writes:
        rows = []
        none = writes["summary"]["none registered"]["writes_per_s"]
        for mode, s in writes["summary"].items():
            rows.append(
                [
                    mode,
                    s["writes_per_s"],
                    f"{s['p50_ms']:.3f}",
                    f"{s['p99_ms']:.3f}",
                    f"{s['writes_per_s'] / none:.3f}",  # of the medians
                    ", ".join(f"{v:,.0f}" for v in s["runs_writes_per_s"]),
                    ", ".join(str(v) for v in s["notifications"]),
                ]
            )
        out.append(
            {
                "title": (
                    f"Write path: backend writes/s with a session registered or not "
                    f"({writes['tasks']} tasks x 3 writes per round, {writes['rounds']} "
                    "rounds)"
                ),
                "headers": [
                    "listeners",
                    "writes/s",
                    "p50 ms",
                    "p99 ms",
                    "vs none registered (medians)",
                    "writes/s per round",
                    "notifications heard per round",
                ],
                "rows": rows,
                "notes": [
                    f"one session registered / none registered: **{writes['ratio']:.3f}x** "
                    "writes/s (median of the rounds' ratios; each STARTED and SUCCESS write "
                    "notifies: `pg_notify` in the trigger, the notify queue at commit)",
                    "none registered: the trigger runs and probes the empty "
                    "`fulldbresult_listener` table (every project that does not wait); none "
                    f"registered / trigger disabled: {writes['trigger_ratio']:.3f}x writes/s "
                    "(median of the rounds' ratios: the probe's cost)",
                    "the rounds' ratios, one registered / none: "
                    + ", ".join(f"{r:.2f}" for r in writes["ratios"])
                    + "; none / trigger disabled: "
                    + ", ".join(f"{r:.2f}" for r in writes["trigger_ratios"])
                    + " (other jobs on the machine move single rounds by more than the "
                    "difference measured)",
                    "writes: `backend.store_result` of PENDING (with the request), STARTED, "
                    "SUCCESS per task, one after the other (`stores.drive`), in one process, "
                    "no worker running; the listening connection is another session of the "
                    "same process, which reads its notifications only between rounds; "
                    "each round runs the three one after the other, in rotating order",
                    f"sessions registered by others before the run: "
                    f"{writes['other_sessions_registered']}",
                ],
            }
        )
    failed = [m for m in args.modes if m not in results]
    if failed:
        out.insert(0, {"title": "Failed", "text": f"FAILED: {', '.join(failed)}"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 samples, 1 round of 300")
    parser.add_argument("--samples", type=int, default=None, help="lag samples per mode (200)")
    parser.add_argument("--threads", type=int, default=8, help="threads waiting at once")
    parser.add_argument("--write-tasks", type=int, default=None, help="tasks per round (300)")
    parser.add_argument("--write-rounds", type=int, default=None, help="rounds (10)")
    parser.add_argument("--write-warmup", type=int, default=100, help="tasks, untimed")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--no-write-path", dest="write_path", action="store_false")
    parser.add_argument("--json-out")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.samples = args.samples or (40 if quick else 200)
    args.write_tasks = args.write_tasks or (200 if quick else 300)
    args.write_rounds = args.write_rounds or (3 if quick else 10)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    _common.check_names(DB_NAME, QUEUE)

    if args.child:
        result = run_mode(args.child, args)
        Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))
        return 0

    # The parent: create and migrate the database once, then one child per mode.
    _common.setup(DB_NAME, queue=QUEUE, var_dir=str(VAR_DIR))
    _common.reap_leftover_worker(PIDFILE, NODE_PREFIX)
    set_trigger(True)  # a killed run may have left it disabled
    _common.truncate(_common.TASK_TABLE)
    child_argv = ["--samples", str(args.samples), "--threads", str(args.threads)]
    results: dict[str, dict] = {}
    for mode in args.modes:
        result = run_child(mode, child_argv)
        if result is not None:
            results[mode] = result
    writes = None
    if args.write_path:
        from testproject.celery_app import app

        print("wait: write path", file=sys.stderr, flush=True)
        writes = write_path(app, args.write_tasks, args.write_rounds, args.write_warmup)
    _common.truncate(_common.TASK_TABLE)
    result = {
        "name": "wait",
        "samples": args.samples,
        "threads": args.threads,
        "sections": sections(results, writes, args),
        "modes": results,
        "write_path": writes,
    }
    _common.finish("wait", result, args.json_out)
    return 0 if len(results) == len(args.modes) else 1


if __name__ == "__main__":
    sys.exit(main())
