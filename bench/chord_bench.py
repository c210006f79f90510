"""Chords and group joins through a real worker: ours vs django-celery-results.

RabbitMQ + PostgreSQL, in a database, a queue and a var dir of their own
(``fulldb_bench_chords``, ``bench_chords``, ``/tmp/fulldb-bench-chords``). For
each backend (ours, the testproject's default ``CELERY_RESULT_BACKEND``, and
django-celery-results, ``FULLDB_BACKEND=django-db``), both with
``CELERY_DB_REUSE_MAX=1000``, a child process of this script starts a worker
(``celery -A testproject worker -P prefork -c 2 -Q bench_chords``), warms it up
with a chord of 20, and measures:

1. A chord of ``--tasks`` (default 1,000) header tasks
   ``add.si(i, i)`` with the body ``tsum.s()``: wall time from
   ``chord(header)(body)`` until ``result.get()`` returns the body's value
   (checked), median of ``--rounds`` (default 3) with the same worker, and
   header tasks/s (tasks / wall time). ``result.get()`` polls every
   ``--interval`` s (default 0.05) with ``follow_parents=False``: by default
   Celery re-reads every unfinished header task at each poll of a chord body
   (``_maybe_reraise_parent_error``), one SELECT per header task per poll, a
   cost of the client and not of the backend (``--follow-parents`` measures
   it anyway).
2. What the whole chord costs the database, from PostgreSQL's own counters of
   the benchmark's database (read from a connection to the ``postgres``
   database, so that reading them costs nothing): ``pg_stat_statements`` calls
   when the extension is loaded (``shared_preload_libraries``), and in any
   case ``pg_stat_database`` deltas (transactions, rows written, rows read).
   PostgreSQL 15 publishes a backend's counters at most once a second and up to
   10 s after it goes idle: each round waits ``--settle`` s (default 12) after
   the body's result before reading them, and the idle background of the
   window (the worker heartbeat, every 2 s) is measured once and subtracted.
   The statements the benchmark process itself sends (publishing the chord,
   polling for its result) are counted at Django's cursor as well.
3. ``GroupResult.get()`` of a group of ``--tasks`` finished tasks: the group is
   run once, then a fresh ``GroupResult`` with the same ids is joined in this
   process, median of ``--group-repeats`` (default 5), with the statements it
   sends (counted at Django's cursor).

The worker runs in its own session and is stopped with SIGTERM in a
``finally`` (Ctrl-C and SIGTERM included), its pool killed after 15 s; a worker
left by a killed run is stopped at the next start (pid file in the var dir).
Logs: ``/tmp/fulldb-bench-chords/worker-<backend>.log``.

    python bench/chord_bench.py [--quick] [--tasks 1000] [--rounds 3] [--group-repeats 5]
        [--interval 0.05] [--follow-parents] [--untracked] [--settle 12] [--no-db-counts]
        [--backends ours,django-celery-results] [--json-out FILE]

``--untracked``: ours with publish tracking off in the bench process (no PENDING row
per header task at publish time), to tell the backend's share from the publisher's.

``--quick``: 200 tasks, one round, 3 group joins (about 1.5 minutes; the full run about 3.5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.reexec_in_venv()

DB_NAME = "fulldb_bench_chords"
QUEUE = "bench_chords"
VAR_DIR = Path("/tmp/fulldb-bench-chords")
NODE_PREFIX = "fulldb-bench-chords"
PIDFILE = VAR_DIR / "worker.pid"
WORKER_START_TIMEOUT = 90.0
#: label -> FULLDB_BACKEND (testproject/settings.py)
BACKENDS = {"ours": "fulldb", "django-celery-results": "django-db"}
SHORT = {"ours": "ours", "dcr": "django-celery-results"}
#: pg_stat_database columns read around each chord.
PG_COLUMNS = (
    "xact_commit",
    "xact_rollback",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "tup_fetched",
    "tup_returned",
)


def worker_command(node: str) -> list[str]:
    return _common.worker_command(QUEUE, node, 2)


# -- worker process (as in e2e.py, on this script's queue, database and var dir) --


class Worker(_common.WorkerProcess):
    def __init__(self, backend: str, log_path: Path) -> None:
        self.backend = backend
        self.node = f"{NODE_PREFIX}-{os.getpid()}@127.0.0.1"
        super().__init__(worker_command(self.node), bench_env(backend), log_path, PIDFILE)


def bench_env(backend: str) -> dict[str, str]:
    return _common.bench_env(
        DB_NAME,
        QUEUE,
        str(VAR_DIR),
        FULLDB_BACKEND=BACKENDS[backend],
        FULLDB_DB_REUSE_MAX="1000",
    )


# -- counting -----------------------------------------------------------------


class StatementCounter:
    """A Django execute wrapper: statements this process sends through Django's cursors
    (the backend's own connection included; BEGIN/COMMIT and health checks not seen)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        self.count += 1
        return execute(sql, params, many, context)


COUNTER = StatementCounter()


def install_counter() -> None:
    """On every Django connection of this process, the ones opened later included (ours
    opens a connection of its own, not in DATABASES, on first use)."""
    from django.db import connections
    from django.db.backends.signals import connection_created

    def hook(sender: Any = None, connection: Any = None, **kwargs: Any) -> None:
        if not any(w is COUNTER for w in connection.execute_wrappers):
            connection.execute_wrappers.append(COUNTER)

    connection_created.connect(hook, weak=False, dispatch_uid="bench-chords-counter")
    for conn in connections.all():
        hook(connection=conn)


class ServerCounters:
    """PostgreSQL's counters of the benchmark's database, read from another database."""

    def __init__(self) -> None:
        import psycopg

        self.conn = psycopg.connect(
            dbname="postgres", autocommit=True, connect_timeout=10, **_common.PG
        )
        self.track_counts = self._show("track_counts") == "on"
        preload = self._show("shared_preload_libraries") or ""
        self.statements_conn = None
        if "pg_stat_statements" in preload:
            self.statements_conn = self._statements_connection()

    def _show(self, name: str) -> str | None:
        row = self.conn.execute(f"SHOW {name}").fetchone()
        return row[0] if row else None

    def _statements_connection(self):
        """pg_stat_statements lives in a database; create it in ours, read it from there."""
        import psycopg

        try:
            conn = psycopg.connect(
                dbname=DB_NAME, autocommit=True, connect_timeout=10, **_common.PG
            )
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()
            return conn
        except psycopg.Error as exc:
            print(f"pg_stat_statements not usable: {exc}", file=sys.stderr)
            return None

    @property
    def method(self) -> str:
        if self.statements_conn is not None:
            return "pg_stat_statements"
        return "pg_stat_database" if self.track_counts else "none"

    def snapshot(self) -> dict[str, float]:
        values: dict[str, float] = {"at": time.monotonic()}
        if self.track_counts:
            row = self.conn.execute(
                f"SELECT {', '.join(PG_COLUMNS)} FROM pg_stat_database WHERE datname = %s",
                [DB_NAME],
            ).fetchone()
            values.update({name: float(v or 0) for name, v in zip(PG_COLUMNS, row, strict=True)})
        if self.statements_conn is not None:
            # This reading statement is itself recorded: left out by its text.
            row = self.statements_conn.execute(
                "SELECT coalesce(sum(calls), 0), coalesce(sum(rows), 0) FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)"
                " AND query NOT LIKE '%%pg_stat_statements%%'",
                [DB_NAME],
            ).fetchone()
            values.update(statements=float(row[0]), statement_rows=float(row[1]))
        return values

    def close(self) -> None:
        for conn in (self.conn, self.statements_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


def delta(before: dict[str, float], after: dict[str, float], background: dict[str, float]):
    """after - before, minus the idle background of the same window (per second)."""
    seconds = after["at"] - before["at"]
    raw = {k: after[k] - before[k] for k in after if k != "at"}
    net = {k: v - background.get(k, 0.0) * seconds for k, v in raw.items()}
    raw["transactions"] = raw.get("xact_commit", 0) + raw.get("xact_rollback", 0)
    net["transactions"] = net.get("xact_commit", 0) + net.get("xact_rollback", 0)
    return {"seconds": seconds, "raw": raw, "net": net}


# -- one backend (child process) ---------------------------------------------


def purge_queue(app) -> int:
    queue = app.amqp.queues[QUEUE]
    with app.connection_for_write() as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        return bound.purge() or 0


def truncate_results() -> None:
    """Every table of both backends (rows, groups, chord counters and parts, heartbeats):
    no worker of this script runs at that point."""
    from django.apps import apps

    tables = [
        model._meta.db_table
        for label in ("django_celery_fulldbresult", "django_celery_results")
        for model in apps.get_app_config(label).get_models()
    ]
    _common.truncate(*tables)


def run_chord(
    n: int, timeout: float, interval: float, follow_parents: bool, check: Any = None
) -> dict:
    """One chord; ``check`` runs at every poll (fails early if the worker died)."""
    from celery import chord
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    from testproject.demo.tasks import add, tsum

    header = [add.si(i, i) for i in range(n)]
    c0 = COUNTER.count
    t0 = time.perf_counter()
    result = chord(header)(tsum.s())
    applied = time.perf_counter()
    c1 = COUNTER.count
    deadline = t0 + timeout
    while True:
        # Slices of a second: a dead worker fails the round at once (a promise given
        # as ``on_interval`` runs only at the first poll).
        try:
            value = result.get(timeout=1.0, interval=interval, follow_parents=follow_parents)
            break
        except CeleryTimeoutError:
            if check is not None:
                check()
            if time.perf_counter() > deadline:
                raise
    done = time.perf_counter()
    expected = n * (n - 1)
    if value != expected:
        raise AssertionError(f"chord body returned {value!r}, expected {expected}")
    return {
        "seconds": done - t0,
        "apply_seconds": applied - t0,
        "tasks_per_s": n / (done - t0),
        "client_statements_apply": c1 - c0,
        "client_statements_wait": COUNTER.count - c1,
    }


def wait_ready(worker: Worker, seconds: float) -> None:
    """Sleep, but fail early if the worker died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        worker.check()
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def group_get(app, n: int, repeats: int, timeout: float) -> dict:
    from celery import group
    from celery.result import AsyncResult, GroupResult

    from testproject.demo.tasks import add

    expected = [2 * i for i in range(n)]
    first = group(add.si(i, i) for i in range(n)).apply_async()
    if first.get(timeout=timeout, interval=0.05) != expected:
        raise AssertionError("group returned unexpected values")
    ids = [r.id for r in first.results]
    runs = []
    for _ in range(repeats):
        fresh = GroupResult(first.id, [AsyncResult(task_id, app=app) for task_id in ids], app=app)
        c0 = COUNTER.count
        t0 = time.perf_counter()
        values = fresh.get(timeout=timeout)
        seconds = time.perf_counter() - t0
        if values != expected:
            raise AssertionError("GroupResult.get() returned unexpected values")
        runs.append({"ms": seconds * 1000, "statements": COUNTER.count - c0})
    return {
        "ms": _common.median(r["ms"] for r in runs),
        "statements": _common.median(r["statements"] for r in runs),
        "native_join": bool(first.supports_native_join),
        "runs": runs,
    }


def run_backend(backend: str, args: argparse.Namespace) -> dict:
    """In the child process of ``backend``: worker, chords, counters, group joins."""
    _common.setup(
        DB_NAME,
        migrate=False,
        queue=QUEUE,
        var_dir=str(VAR_DIR),
        FULLDB_BACKEND=BACKENDS[backend],
        FULLDB_DB_REUSE_MAX="1000",
    )

    from testproject.celery_app import app

    # Publish tracking (a PENDING row per sent task, written by the publisher) is part of
    # ours; django-celery-results has nothing like it, so its publisher does not pay for it.
    # --untracked: ours without it, to tell the backend's share from the publisher's.
    track_publish = backend == "ours" and not args.untracked
    _common.set_setting("TRACK_PUBLISH", track_publish)
    install_counter()
    _common.reap_leftover_worker(PIDFILE, NODE_PREFIX)
    purged = purge_queue(app)
    truncate_results()
    counters = ServerCounters() if args.db_counts else None
    if counters is not None and counters.method == "none":
        print("no usable counters on this server (track_counts off): wall times only")
        counters.close()
        counters = None
    log_path = VAR_DIR / f"worker-{'dcr' if backend != 'ours' else 'ours'}.log"
    worker = Worker(backend, log_path)
    rounds: list[dict] = []
    background: dict[str, float] = {}
    try:
        worker.start()
        # Warm-up: both pool processes import, connect, and a small chord completes.
        run_chord(20, WORKER_START_TIMEOUT, args.interval, False, worker.check)
        group_get(app, 20, 1, WORKER_START_TIMEOUT)
        before = None
        if counters is not None:
            # Counters of the warm-up published, then an idle window: the background.
            wait_ready(worker, args.settle)
            idle0 = counters.snapshot()
            wait_ready(worker, args.settle)
            before = counters.snapshot()
            seconds = before["at"] - idle0["at"]
            background = {k: (before[k] - idle0[k]) / seconds for k in before if k != "at"}
            print(
                f"  background: {background.get('xact_commit', 0):.2f} commits/s", file=sys.stderr
            )
        for index in range(args.rounds):
            run = run_chord(
                args.tasks, args.timeout, args.interval, args.follow_parents, worker.check
            )
            if counters is not None:
                wait_ready(worker, args.settle)
                after = counters.snapshot()
                run["db"] = delta(before, after, background)
                before = after
            worker.check()
            rounds.append(run)
            db = run.get("db", {}).get("net", {})
            print(
                f"  {backend} round {index + 1}: {run['seconds']:.2f} s "
                f"({run['tasks_per_s']:,.0f} header tasks/s, apply {run['apply_seconds']:.2f} s)"
                + (f", {db['transactions']:,.0f} transactions" if db else ""),
                file=sys.stderr,
            )
        joined = group_get(app, args.tasks, args.group_repeats, args.timeout)
        print(f"  {backend} GroupResult.get(): {joined['ms']:.1f} ms", file=sys.stderr)
    finally:
        code = worker.stop()
        if counters is not None:
            counters.close()
    return {
        "backend": backend,
        "track_publish": track_publish,
        "tasks": args.tasks,
        "seconds": _common.median(r["seconds"] for r in rounds),
        "tasks_per_s": _common.median(r["tasks_per_s"] for r in rounds),
        "apply_seconds": _common.median(r["apply_seconds"] for r in rounds),
        "rounds": rounds,
        "db_method": counters.method if counters is not None else "none",
        "background_per_s": background,
        "group_get": joined,
        "purged_before": purged,
        "worker_exit_code": code,
        "worker_log": str(log_path),
    }


# -- the parent: one child per backend, then the report --------------------------


def run_child(backend: str, argv: list[str]) -> dict | None:
    out = VAR_DIR / f"child-{'dcr' if backend != 'ours' else 'ours'}.json"
    return _common.run_child(
        "chords", str(Path(__file__).resolve()), argv, backend, out, bench_env(backend)
    )


def median_db(result: dict, key: str) -> float:
    return _common.median(r["db"]["net"].get(key, float("nan")) for r in result["rounds"])


def label(name: str, result: dict) -> str:
    if name == "ours" and not result.get("track_publish", True):
        return "ours, publish tracking off"
    return name


def sections(results: dict[str, dict], args: argparse.Namespace) -> list[dict]:
    dcr = results.get("django-celery-results")
    n = args.tasks
    rows = []
    for name, r in results.items():
        ratio = ""
        if name == "ours" and dcr:
            ratio = f"**{dcr['seconds'] / r['seconds']:.2f}x**"
        rows.append(
            [
                label(name, r),
                f"{r['seconds']:.2f}",
                r["tasks_per_s"],
                f"{r['apply_seconds']:.2f}",
                ", ".join(f"{x['seconds']:.2f}" for x in r["rounds"]),
                ratio,
            ]
        )
    chord_section = {
        "title": (
            f"Chord of {n:,} `add` tasks, body `tsum` (prefork -c 2, RabbitMQ + PostgreSQL, "
            f"CELERY_DB_REUSE_MAX=1000, median of {args.rounds})"
        ),
        "headers": [
            "backend",
            "s until the body's result",
            "header tasks/s",
            "apply s",
            "s per round",
            "d-c-r / ours",
        ],
        "rows": rows,
        "notes": [
            "from `chord(header)(tsum.s())` until `result.get()` returns the body's value "
            f"(polled every {args.interval:g} s, "
            + (
                "with Celery's default follow_parents=True: every unfinished header task "
                "is read at each poll)"
                if args.follow_parents
                else "follow_parents=False: Celery would otherwise read every unfinished "
                "header task at each poll, a client cost)"
            ),
            "apply s: `chord(...)(...)` alone (publishing the header; "
            + (
                "ours writes a PENDING row per task there, publish tracking as the testproject "
                "is configured"
                if not args.untracked
                else "ours with publish tracking off in the bench process (--untracked): no "
                "PENDING row per task"
            )
            + "; django-celery-results has no such write)",
            "d-c-r / ours: django-celery-results' time over ours (higher is better for us)",
            "worker: `" + " ".join(worker_command(f"{NODE_PREFIX}-PID@127.0.0.1")[1:]) + "`",
        ],
    }
    out = [chord_section]
    method = next((r["db_method"] for r in results.values()), "none")
    if method != "none":
        db_rows = []
        for name, r in results.items():
            client = _common.median(
                r2["client_statements_apply"] + r2["client_statements_wait"] for r2 in r["rounds"]
            )
            client_apply = _common.median(r2["client_statements_apply"] for r2 in r["rounds"])
            row = [label(name, r)]
            if method == "pg_stat_statements":
                row.append(f"{median_db(r, 'statements'):,.0f}")
            txns = median_db(r, "transactions")
            written = sum(median_db(r, k) for k in ("tup_inserted", "tup_updated", "tup_deleted"))
            row += [
                f"{txns:,.0f}",
                f"{txns / n:.2f}",
                f"{median_db(r, 'tup_inserted'):,.0f} / {median_db(r, 'tup_updated'):,.0f} / "
                f"{median_db(r, 'tup_deleted'):,.0f}",
                f"{written / n:.2f}",
                f"{median_db(r, 'tup_fetched'):,.0f}",
                f"{median_db(r, 'tup_returned'):,.0f}",
                f"{client:,.0f} ({client_apply:,.0f} applying)",
            ]
            db_rows.append(row)
        headers = ["backend"]
        if method == "pg_stat_statements":
            headers.append("SQL statements (pg_stat_statements)")
        headers += [
            "transactions",
            "transactions per header task",
            "rows inserted / updated / deleted",
            "rows written per header task",
            "rows fetched",
            "rows returned",
            "statements sent by the bench process",
        ]
        background = {
            name: r["background_per_s"].get("xact_commit", 0.0) for name, r in results.items()
        }
        notes = []
        if method == "pg_stat_statements":
            notes.append(
                "SQL statements: the delta of `sum(calls)` in pg_stat_statements for this "
                "database (BEGIN/COMMIT included when `pg_stat_statements.track_utility` is on)"
            )
        else:
            notes.append(
                "**Measure used: transactions, not statements.** pg_stat_statements is not "
                "loaded on this server (`shared_preload_libraries` is empty), so the count is "
                "`xact_commit + xact_rollback` of pg_stat_database for this database: one per "
                "statement sent in autocommit, one per `transaction.atomic()` block whatever "
                "it holds. It is a lower bound of the statements, not a statement count"
            )
        notes += [
            "everything the chord costs on the server: the bench process publishing the chord "
            "(ours: its PENDING rows) and polling for the body's result, the worker storing "
            "STARTED and SUCCESS of every header task, counting the chord parts, joining the "
            "header and sending and storing the body; median of the rounds",
            f"read {args.settle:g} s after the body's result (PostgreSQL 15 publishes a "
            "backend's counters up to 10 s after it goes idle), from a connection to another "
            "database (reading costs nothing here); the idle background of each window is "
            "subtracted: "
            + ", ".join(f"{name} {v:.2f} commits/s" for name, v in background.items())
            + " (our worker heartbeat, every 2 s, runs only with our backend; autovacuum may add a "
            "few)",
            "rows inserted / updated / deleted, fetched, returned: `tup_*` of pg_stat_database, "
            "system catalogs included (fetched: live rows fetched by index scans; returned: "
            "live rows fetched by sequential scans plus index entries returned by index scans)",
            "statements sent by the bench process: counted at Django's cursor "
            "(execute wrapper, the backend's own connection included; BEGIN/COMMIT and "
            "connection health checks not seen), publishing (applying) and polling together",
        ]
        if "django-celery-results" in results:
            notes.append(
                "django-celery-results' worker still writes one PENDING row in our table for "
                "the body it sends (publish tracking is on in the worker's testproject "
                "settings): one transaction"
            )
        out.append(
            {
                "title": f"What a chord of {n:,} costs the database ({method})",
                "headers": headers,
                "rows": db_rows,
                "notes": notes,
            }
        )
    group_rows = []
    for name, r in results.items():
        g = r["group_get"]
        ratio = ""
        if name == "ours" and dcr:
            ratio = f"**{dcr['group_get']['ms'] / g['ms']:.2f}x**"
        group_rows.append(
            [
                label(name, r),
                f"{g['ms']:.1f}",
                ", ".join(f"{x['ms']:.0f}" for x in g["runs"]),
                f"{g['statements']:,.0f}",
                "native (get_many)" if g["native_join"] else "one get() per task",
                ratio,
            ]
        )
    out.append(
        {
            "title": (
                f"GroupResult.get() of {n:,} finished tasks (bench process, median of "
                f"{args.group_repeats})"
            ),
            "headers": [
                "backend",
                "ms",
                "ms per repeat",
                "statements",
                "join",
                "d-c-r / ours",
            ],
            "rows": group_rows,
            "notes": [
                "the group `group(add.si(i, i) for i in range(N))` is run once through the "
                "worker, then each repeat joins a fresh `GroupResult` with the same ids "
                "(Celery's result cache is off: `result_cache_max` = -1)",
                "statements: counted at Django's cursor in the bench process",
            ],
        }
    )
    failed = [b for b in args.backends if b not in results]
    if failed:
        out.insert(0, {"title": "Failed", "text": f"FAILED: {', '.join(failed)}"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 tasks, 1 round, 3 joins")
    parser.add_argument("--tasks", type=int, default=None, help="header tasks (1000)")
    parser.add_argument("--rounds", type=int, default=None, help="chords per backend (3)")
    parser.add_argument("--group-repeats", type=int, default=None, help="joins timed (5)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per chord")
    parser.add_argument("--interval", type=float, default=0.05, help="result.get() polling")
    parser.add_argument(
        "--follow-parents",
        action="store_true",
        help="result.get() with Celery's default follow_parents=True",
    )
    parser.add_argument(
        "--untracked",
        action="store_true",
        help="ours with publish tracking off in the bench process (no PENDING row per task)",
    )
    parser.add_argument(
        "--settle", type=float, default=12.0, help="seconds before reading the counters"
    )
    parser.add_argument(
        "--no-db-counts",
        dest="db_counts",
        action="store_false",
        help="wall times only (no counter reads, no settle waits)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated: ours, django-celery-results (or dcr)",
    )
    parser.add_argument("--json-out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.tasks = args.tasks or (200 if quick else 1000)
    args.rounds = args.rounds or (1 if quick else 3)
    args.group_repeats = args.group_repeats or (3 if quick else 5)
    args.backends = [SHORT.get(b.strip(), b.strip()) for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    _common.check_names(DB_NAME, QUEUE)

    if args.child:
        result = run_backend(args.child, args)
        Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))
        return 0

    # The parent: create and migrate the database once, then one child per backend.
    _common.setup(DB_NAME, queue=QUEUE, var_dir=str(VAR_DIR))
    _common.reap_leftover_worker(PIDFILE, NODE_PREFIX)
    child_argv = [
        "--tasks",
        str(args.tasks),
        "--rounds",
        str(args.rounds),
        "--group-repeats",
        str(args.group_repeats),
        "--timeout",
        str(args.timeout),
        "--interval",
        str(args.interval),
        "--settle",
        str(args.settle),
        *(["--follow-parents"] if args.follow_parents else []),
        *(["--untracked"] if args.untracked else []),
        *([] if args.db_counts else ["--no-db-counts"]),
    ]
    results: dict[str, dict] = {}
    for backend in args.backends:
        result = run_child(backend, child_argv)
        if result is not None:
            results[backend] = result
    result = {
        "name": "chords",
        "tasks": args.tasks,
        "rounds": args.rounds,
        "sections": sections(results, args),
        "backends": results,
    }
    ours, dcr = results.get("ours"), results.get("django-celery-results")
    if ours and dcr:
        result["ratio"] = dcr["seconds"] / ours["seconds"]
        result["group_get_ratio"] = dcr["group_get"]["ms"] / ours["group_get"]["ms"]
    _common.finish("chords", result, args.json_out)
    return 0 if len(results) == len(args.backends) else 1


if __name__ == "__main__":
    sys.exit(main())
