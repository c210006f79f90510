"""Backend writes in one process on PostgreSQL: ours vs django-celery-results.

(a) SQL statements per write (first write of a task id: STARTED; a later
    write: SUCCESS), counted with Django's CaptureQueriesContext and, as a
    cross-check, from a libpq trace of what goes over the wire.
(b) Stores per second for N tasks x 3 writes (PENDING with the request,
    STARTED, SUCCESS), with p50/p99 latency per write, for our backend,
    django-celery-results (``result_extended``) and a floor: one raw
    ``INSERT ... ON CONFLICT DO UPDATE SET status`` into a two-column table.
    Each measurement runs ``--repeat`` times (default 3), interleaved; the
    median is reported.

    python bench/stores.py [--tasks 3000] [--repeat 3] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

FLOOR_TABLE = "fulldb_bench_floor"
#: Tasks each backend stores before its statements are counted (``statements_per_write``).
WARM_TASKS = 3
TASK_NAME = "testproject.demo.tasks.add"
HOSTNAME = "bench@127.0.0.1"


def make_request(task_id: str, i: int):
    from celery.app.task import Context

    args = [i, i]
    return Context(
        id=task_id,
        task=TASK_NAME,
        args=args,
        kwargs={},
        argsrepr=repr(args),
        kwargsrepr="{}",
        hostname=HOSTNAME,
        delivery_info={"routing_key": _common.QUEUE, "exchange": "", "priority": 0},
        retries=0,
        is_eager=False,
    )


def build_writers(app):
    """name -> (store(task_id, result, state, request), table to truncate)."""
    from django.db import connections
    from django_celery_results.backends import DatabaseBackend

    from django_celery_fulldbresult.result_backends import DatabaseResultBackend

    app.conf.result_extended = True
    ours = DatabaseResultBackend(app=app)
    dcr = DatabaseBackend(app=app)

    def store_ours(task_id, result, state, request):
        ours.store_result(task_id, result, state, request=request)

    def store_dcr(task_id, result, state, request):
        dcr.store_result(task_id, result, state, request=request)

    floor_cursor = connections["default"].cursor()
    floor_sql = (
        f"INSERT INTO {FLOOR_TABLE} (task_id, status) VALUES (%s, %s) "
        "ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status"
    )

    def store_floor(task_id, result, state, request):
        floor_cursor.execute(floor_sql, [task_id, state])

    return {
        "ours": (store_ours, _common.TASK_TABLE),
        "django-celery-results": (store_dcr, _common.DCR_TABLE),
        "floor (raw upsert)": (store_floor, FLOOR_TABLE),
    }, (ours, dcr)


def create_floor_table() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} "
            "(task_id varchar(255) PRIMARY KEY, status varchar(50) NOT NULL)"
        )


# -- (a) statements per write -----------------------------------------------


def statements_per_write(ours, dcr) -> dict:
    from celery import states
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from django_celery_fulldbresult.db import write_alias

    hidden = write_alias()
    rows = []
    raw = {}
    for name, backend, alias in (
        ("ours", ours, hidden),
        ("django-celery-results", dcr, "default"),
    ):
        # The steady state of a worker's connection: it has run each statement before
        # (ours sends a statement text once per session, then only its parameters).
        for i in range(WARM_TASKS):
            warm_id = str(uuid.uuid4())
            warm = make_request(warm_id, i)
            backend.store_result(warm_id, None, states.STARTED, request=warm)
            backend.store_result(warm_id, 2, states.SUCCESS, request=warm)
        writes = (
            ("first write (STARTED)", states.STARTED, {"pid": os.getpid(), "hostname": HOSTNAME}),
            ("later write (SUCCESS)", states.SUCCESS, 2),
        )
        conn = connections[alias]
        other = connections[next(a for a in ("default", hidden) if a != alias)]
        # One task counted by Django, another traced on the wire with Django's query logging
        # off (a logged statement goes as text: the log reads it back from the driver).
        counted_id, traced_id = str(uuid.uuid4()), str(uuid.uuid4())
        counted, traced = make_request(counted_id, 1), make_request(traced_id, 1)
        for label, state, result in writes:
            with CaptureQueriesContext(conn) as captured, CaptureQueriesContext(other) as elsewhere:
                backend.store_result(counted_id, result, state, request=counted)
            with _common.wire_trace(conn) as wire:
                backend.store_result(traced_id, result, state, request=traced)
            kinds = [q["sql"].split(None, 1)[0].upper() for q in captured.captured_queries]
            rows.append(
                [
                    name,
                    label,
                    str(len(captured)),
                    str(len(elsewhere)),
                    str(wire.get("round_trips", "-")),
                    f"{wire['bytes_sent']:,}" if "bytes_sent" in wire else "-",
                    ", ".join(kinds),
                ]
            )
            raw[f"{name}/{label}"] = {
                "statements": len(captured),
                "other_connection": len(elsewhere),
                "wire": dict(wire),
                "kinds": kinds,
            }
    return {
        "title": "Statements per write (PostgreSQL)",
        "headers": [
            "backend",
            "write",
            "statements (CaptureQueriesContext)",
            "statements on the other connection",
            "round trips (libpq trace)",
            "bytes sent",
            "statement kinds",
        ],
        "rows": rows,
        "notes": [
            f"ours writes through its dedicated connection `{hidden}`; the other connection "
            "is `default` (and vice versa for django-celery-results)",
            "round trips = client Query/Sync messages in a libpq trace of the connection "
            "(includes BEGIN/COMMIT)",
            f"measured after {WARM_TASKS} tasks stored on the same connection (a worker's "
            "steady state): ours then sends its prepared statements' parameters only "
            "(`DJANGO_CELERY_FULLDBRESULT_PREPARED_STATEMENTS`)",
        ],
        "raw": raw,
    }


# -- (b) stores per second ---------------------------------------------------


def drive(store, count: int) -> dict:
    from celery import states

    ids = [str(uuid.uuid4()) for _ in range(count)]
    pid = os.getpid()
    latencies: list[int] = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for i, task_id in enumerate(ids):
        request = make_request(task_id, i)
        for state, result in (
            (states.PENDING, None),
            (states.STARTED, {"pid": pid, "hostname": HOSTNAME}),
            (states.SUCCESS, 2 * i),
        ):
            t0 = clock()
            store(task_id, result, state, request)
            latencies.append(clock() - t0)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "writes": len(latencies),
        "seconds": elapsed,
        "writes_per_s": len(latencies) / elapsed,
        "p50_ms": _common.percentile(latencies, 50) / 1e6,
        "p99_ms": _common.percentile(latencies, 99) / 1e6,
    }


def throughput(writers: dict, tasks: int, repeat: int, warmup: int) -> dict:
    from django_celery_fulldbresult.models import TaskResultMeta
    from django_celery_fulldbresult.states import SUCCESS

    tables = [table for _, table in writers.values()]
    for store, _ in writers.values():  # connections, statement caches, imports
        drive(store, warmup)
    runs: dict[str, list[dict]] = {name: [] for name in writers}
    for _ in range(repeat):
        for name, (store, table) in writers.items():
            _common.truncate(table)
            runs[name].append(drive(store, tasks))
    # Sanity: the last run of ours left every task SUCCESS.
    done = TaskResultMeta.objects.filter(status=SUCCESS).count()
    _common.truncate(*tables)

    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "writes_per_s": _common.median(r["writes_per_s"] for r in results),
            "p50_ms": _common.median(r["p50_ms"] for r in results),
            "p99_ms": _common.median(r["p99_ms"] for r in results),
            "runs_writes_per_s": [round(r["writes_per_s"], 1) for r in results],
        }
    ours = summary["ours"]
    dcr = summary["django-celery-results"]
    rows = []
    for name, s in summary.items():
        rows.append(
            [
                name,
                s["writes_per_s"],
                s["writes_per_s"] / 3,
                s["p50_ms"],
                s["p99_ms"],
                ", ".join(f"{v:,.0f}" for v in s["runs_writes_per_s"]),
            ]
        )
    ratio = ours["writes_per_s"] / dcr["writes_per_s"]
    floor = summary["floor (raw upsert)"]["writes_per_s"]
    return {
        "title": f"Stores per second ({tasks} tasks x 3 writes, median of {repeat})",
        "headers": ["writer", "writes/s", "tasks/s", "p50 ms", "p99 ms", "writes/s per run"],
        "rows": [[r[0], *r[1:3], f"{r[3]:.3f}", f"{r[4]:.3f}", r[5]] for r in rows],
        "notes": [
            f"ratio ours / django-celery-results (writes/s): **{ratio:.2f}x**",
            f"ours reaches {ours['writes_per_s'] / floor:.0%} of the raw single-statement floor",
            "writes: PENDING (with the request), STARTED, SUCCESS per task, one task after "
            "the other, each write through `backend.store_result(...)`",
            f"sanity: {done} of {tasks} rows SUCCESS after the last run of ours",
        ],
        "summary": summary,
        "ratio": ratio,
        "sanity_success_rows": done,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200, help="tasks per writer, untimed")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    _common.setup()
    from testproject.celery_app import app

    create_floor_table()
    writers, (ours, dcr) = build_writers(app)
    _common.truncate(_common.TASK_TABLE, _common.DCR_TABLE, FLOOR_TABLE)
    sections = [statements_per_write(ours, dcr)]
    sections.append(throughput(writers, args.tasks, args.repeat, args.warmup))
    result = {"name": "stores", "sections": sections}
    _common.finish("stores", result, args.json_out)
    return result


if __name__ == "__main__":
    main()
