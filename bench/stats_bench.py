"""stats() and the admin dashboard on a 1,000,000-row task table (PostgreSQL).

The window's past hours are read from their rollups (``rollups``): the first call with no
hour sealed, the steady state and ``exact=True`` (every row) are measured apart.

Fills TaskResultMeta with one ``INSERT ... SELECT FROM generate_series``: rows in time
order over the last ``--days`` days (2 by default: a 24 h window holds half the table;
``--days 30``: a 24 h window holds 3 %), 93 % SUCCESS, 5 % FAILURE, 1 % REVOKED, 1 %
SCHEDULED (eta in the next 3 days, a few overdue), 30 % of the last 10 minutes in flight
(PENDING/STARTED/RETRY), one row in 10,000 PENDING for good (stale); 12 task names; run
times 0-10 s. Then VACUUM ANALYZE, and it measures:

* ``TaskResultMeta.objects.stats(window)`` for 24 h and 1 h: wall time (median of
  ``--repeat``), the statements it runs and the time of each;
* ``EXPLAIN (ANALYZE, BUFFERS)`` of each statement of the 24 h case (indexes used);
* the dashboard page (Django test client, logged-in superuser, ``DEBUG=False``);
* the same with the covering index that ``--with-index`` creates in this database only
  (no migration ships it; see docs/design.md "Statistics").

The rows live in their own database (``fulldb_bench_stats``) and are reused by later
runs unless ``--refill`` is given.

    python bench/stats_bench.py [--rows 1000000] [--days 2] [--refill] [--repeat 5]
                                [--with-index] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.reexec_in_venv()

DB_NAME = "fulldb_bench_stats"
#: Reused rows are filled again when the newest is older than this.
FRESH_SECONDS = 600
QUEUE = "bench_stats"
VAR_DIR = "/tmp/fulldb-bench-stats"
#: The covering index --with-index tries (dropped again at the end).
COVERING_INDEX = "fdr_bench_done_covering_idx"
COVERING_SQL = (
    f"CREATE INDEX IF NOT EXISTS {COVERING_INDEX} ON {_common.TASK_TABLE} "
    "(date_done) INCLUDE (status, task, date_started)"
)

FILL_SQL = f"""
INSERT INTO {_common.TASK_TABLE} (
    task_id, task, status, args, kwargs, replayable, queue, hostname, retries,
    eta, date_submitted, date_started, date_done, date_modified
)
SELECT
    'bench-' || s.g,
    'shop.tasks.job' || (s.g %% 12),
    s.status,
    jsonb_build_array(s.g), '{{}}'::jsonb, true, 'celery',
    'worker' || (1 + s.g %% 8) || '@bench',
    CASE WHEN s.status = 'RETRY' THEN 1 ELSE 0 END,
    CASE WHEN s.status = 'SCHEDULED' THEN now() + (s.r - 0.01) * interval '3 days' END,
    s.ts - s.run - interval '1 second',
    CASE WHEN s.status IN ('SUCCESS', 'FAILURE', 'STARTED') THEN s.ts - s.run END,
    CASE WHEN s.status IN ('SUCCESS', 'FAILURE', 'REVOKED') THEN s.ts END,
    s.ts
FROM (
    SELECT
        g,
        CASE
            -- in flight: the last 10 minutes
            WHEN t.ts > now() - interval '10 minutes' AND g %% 10 < 3
                THEN (ARRAY['PENDING', 'STARTED', 'RETRY'])[1 + g %% 3]
            WHEN g %% 10000 = 7 THEN 'PENDING'  -- lost long ago: stale
            WHEN g %% 100 = 99 THEN 'SCHEDULED'
            WHEN g %% 100 < 93 THEN 'SUCCESS'
            WHEN g %% 100 < 98 THEN 'FAILURE'
            ELSE 'REVOKED'
        END AS status,
        t.ts,
        random() * interval '10 seconds' AS run,
        random() AS r
    FROM generate_series(1, %s) AS g,
        -- rows arrive in time order, as in a live table (date_done follows the heap order)
        LATERAL (SELECT now() - (%s - g) / %s::float * %s * interval '1 day'
                 - random() * interval '1 second' AS ts) AS t
) AS s
"""


def cursor():
    from django.db import connection

    return connection.cursor()


def row_count() -> int:
    with cursor() as c:
        c.execute(f"SELECT COUNT(*) FROM {_common.TASK_TABLE}")
        return c.fetchone()[0]


def newest_age_seconds() -> float:
    with cursor() as c:
        c.execute(
            f"SELECT EXTRACT(EPOCH FROM now() - MAX(date_modified)) FROM {_common.TASK_TABLE}"
        )
        age = c.fetchone()[0]
    return float("inf") if age is None else float(age)


def fill(rows: int, days: float, refill: bool) -> dict:
    existing = row_count()
    # Rows filled long ago no longer put half the table in a 24 h window: filled again.
    if existing >= rows and not refill and newest_age_seconds() < FRESH_SECONDS:
        return {"filled": False, "rows": existing, "seconds": 0.0}
    started = time.perf_counter()
    with cursor() as c:
        c.execute(f"TRUNCATE {_common.TASK_TABLE}")
        c.execute(FILL_SQL, [rows, rows, rows, days])
        c.execute(f"VACUUM ANALYZE {_common.TASK_TABLE}")
    return {"filled": True, "rows": row_count(), "seconds": time.perf_counter() - started}


def forget_rollups() -> None:
    from django_celery_fulldbresult import rollups

    rollups.forget("default")


def timed_first_stats(window: timedelta) -> dict:
    """stats() with no hour sealed yet: it counts every whole hour of the window once."""
    from django_celery_fulldbresult.models import StatsHour, TaskResultMeta

    forget_rollups()
    t0 = time.perf_counter()
    TaskResultMeta.objects.stats(window)
    wall = (time.perf_counter() - t0) * 1000
    return {"wall_ms": wall, "sealed_hours": StatsHour.objects.count()}


def timed_stats(window: timedelta, repeat: int, exact: bool = False) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_celery_fulldbresult.models import TaskResultMeta

    TaskResultMeta.objects.stats(window, exact=exact)  # warm, as a periodic scrape finds it
    walls, per_statement, figures = [], [], None
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as queries:
            t0 = time.perf_counter()
            figures = TaskResultMeta.objects.stats(window, exact=exact)
            walls.append((time.perf_counter() - t0) * 1000)
        per_statement.append([float(q["time"]) * 1000 for q in queries.captured_queries])
    statements = [q["sql"] for q in queries.captured_queries]
    medians = [_common.median(col) for col in zip(*per_statement, strict=False)]
    return {
        "wall_ms": _common.median(walls),
        "walls_ms": walls,
        "statements": statements,
        "statement_ms": medians,
        "figures": figures,
    }


def explain(sql: str) -> tuple[list[str], float]:
    with cursor() as c:
        c.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
        lines = [r[0] for r in c.fetchall()]
    execution = float(re.search(r"Execution Time: ([\d.]+) ms", "\n".join(lines)).group(1))
    return lines, execution


def indexes_in(lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    found = re.findall(
        r"(?:Index (?:Only )?Scan(?: Backward)? using|Bitmap Index Scan on) (\w+)", text
    )
    return sorted(set(found))


def timed_hourly(repeat: int) -> float:
    from django_celery_fulldbresult import stats
    from django_celery_fulldbresult.models import TaskResultMeta

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        stats.hourly(TaskResultMeta.objects.all())
        times.append((time.perf_counter() - t0) * 1000)
    return _common.median(times)


def timed_dashboard(repeat: int) -> dict:
    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    user, _ = User.objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    url = reverse("admin:django_celery_fulldbresult_taskresultmeta_dashboard")
    client.get(url)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, response.status_code
    return {"ms": _common.median(times), "all_ms": times, "bytes": len(response.content)}


def label(sql: str) -> str:
    if "statshourruntimes" in sql:
        return "sealed hours: run-time histograms"
    if "statshour" in sql:
        return "sealed hours: counts"
    if "LN(" in sql:
        return "counts and run-time bins, rest of the window"
    if "percentile_cont" in sql:
        return "run-time percentiles (per task + overall)"
    if '"backlog"' in sql:
        return "scheduled backlog/due/lateness"
    if "scheduled_id" in sql:
        return "stale scheduled claims (count)"
    if "__count" in sql:
        return "stale tasks (count)"
    if "GROUP BY" in sql:
        return "counts per state and task"
    return sql[:40]


def measure(name: str, repeat: int) -> dict:
    first = timed_first_stats(timedelta(hours=24))
    day = timed_stats(timedelta(hours=24), repeat)
    exact = timed_stats(timedelta(hours=24), repeat, exact=True)
    hour = timed_stats(timedelta(hours=1), repeat)
    plans = []
    for sql in day["statements"]:
        lines, execution = explain(sql)
        plans.append(
            {
                "label": label(sql),
                "execution_ms": execution,
                "indexes": indexes_in(lines),
                "seq_scan": bool(
                    re.search(rf"Seq Scan on {_common.TASK_TABLE}\b", "\n".join(lines))
                ),
                "plan": lines,
            }
        )
    return {
        "name": name,
        "first": first,
        "day": day,
        "exact": exact,
        "hour": hour,
        "plans": plans,
        "hourly_ms": timed_hourly(repeat),
        "dashboard": timed_dashboard(repeat),
    }


def section(case: dict, facts: str) -> dict:
    rows = [
        [
            p["label"],
            f"{ms:.1f}",
            f"{p['execution_ms']:.1f}",
            ", ".join(p["indexes"]) or "none",
            "yes" if p["seq_scan"] else "no",
        ]
        for p, ms in zip(case["plans"], case["day"]["statement_ms"], strict=False)
    ]
    figures = case["day"]["figures"]
    return {
        "title": f"stats() and dashboard, {case['name']}",
        "text": facts,
        "headers": [
            "statement (24 h window)",
            "ms (client)",
            "ms (EXPLAIN ANALYZE)",
            "indexes",
            "seq scan",
        ],
        "rows": rows,
        "notes": [
            f"`stats(timedelta(hours=24))`: **{case['day']['wall_ms']:.0f} ms** median of "
            f"{len(case['day']['walls_ms'])} ({min(case['day']['walls_ms']):.0f}-"
            f"{max(case['day']['walls_ms']):.0f}), {len(case['day']['statements'])} statements, "
            f"{figures['total']:,} rows in the window",
            f"first `stats(timedelta(hours=24))` with no hour sealed: "
            f"{case['first']['wall_ms']:.0f} ms (counts and keeps "
            f"{case['first']['sealed_hours']} hours; then once an hour, one hour)",
            f"`stats(timedelta(hours=24), exact=True)` (every row of the window, exact "
            f"percentiles): **{case['exact']['wall_ms']:.0f} ms** median, "
            f"{len(case['exact']['statements'])} statements",
            f"`stats(timedelta(hours=1))`: **{case['hour']['wall_ms']:.0f} ms** "
            f"({case['hour']['figures']['total']:,} rows in the window)",
            f"`stats.hourly()` (the chart's query, 24 h): {case['hourly_ms']:.0f} ms",
            f"dashboard page (test client, superuser): **{case['dashboard']['ms']:.0f} ms** "
            f"median, {case['dashboard']['bytes']:,} bytes",
        ],
        "code": "\n\n".join(f"-- {p['label']}\n" + "\n".join(p["plan"]) for p in case["plans"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--refill", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--with-index", action="store_true", help="also measure with " + COVERING_INDEX
    )
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    _common.setup(DB_NAME, queue=QUEUE, var_dir=VAR_DIR)
    filled = fill(args.rows, args.days, args.refill)
    with cursor() as c:
        c.execute(f"DROP INDEX IF EXISTS {COVERING_INDEX}")
        c.execute(f"ANALYZE {_common.TASK_TABLE}")
        c.execute(
            "SELECT pg_size_pretty(pg_table_size(%s)), pg_size_pretty(pg_indexes_size(%s))",
            [_common.TASK_TABLE, _common.TASK_TABLE],
        )
        heap, indexes = c.fetchone()
    fill_text = (
        f"filled {filled['rows']:,} rows in {filled['seconds']:.1f} s"
        if filled["filled"]
        else f"reused {filled['rows']:,} rows (--refill rebuilds them)"
    )
    facts = f"{fill_text}, spread over {args.days:g} days; heap {heap}, indexes {indexes}."
    cases = [measure("indexes of the migrations", args.repeat)]
    sections = [section(cases[0], facts)]
    if args.with_index:
        with cursor() as c:
            t0 = time.perf_counter()
            c.execute(COVERING_SQL)
            built = time.perf_counter() - t0
            c.execute(f"VACUUM ANALYZE {_common.TASK_TABLE}")
        try:
            cases.append(measure(f"plus {COVERING_INDEX}", args.repeat))
        finally:
            with cursor() as c:
                c.execute(f"DROP INDEX IF EXISTS {COVERING_INDEX}")
        sections.append(section(cases[1], f"{COVERING_SQL} (built in {built:.1f} s)."))
    for case in cases:  # the raw result keeps figures, not the whole stats dict
        for key in ("day", "exact", "hour"):
            case[key]["figures"] = {k: case[key]["figures"][k] for k in ("total", "runtime")}
    result = {"name": "stats", "sections": sections, "fill": filled, "cases": cases}
    _common.finish("stats", result, args.json_out)
    return result


if __name__ == "__main__":
    main()
