"""The task admin at 1,000,000 rows on PostgreSQL, next to django-celery-results' admin.

Fills TaskResultMeta (and django-celery-results' TaskResult, same shape) with one
``INSERT ... SELECT FROM generate_series`` each: ids follow submission time over
the last 7 days, about 90 % SUCCESS, 3 % FAILURE, the rest PENDING, STARTED,
RETRY and SCHEDULED, 20 task names, 5 % periodic. Then, through Django's test
client as a logged-in superuser (the whole request: middleware, session,
permissions, template rendering), median of ``--repeat`` after one warm-up:

* changelist pages: default, filtered by state, by task name, by periodic task,
  submitted in the last hour, stale for 1 hour;
* searches: an exact task id, a common and a rare task-name prefix;
* the same pages of django-celery-results' ``TaskResult`` admin at 1M rows;
* the Retry action on 1,000 selected rows (select across a filter): the
  confirmation page, then the confirmed POST that sends 1,000 copies
  (RabbitMQ, queue ``bench_admin``, purged afterwards).

Targets: changelist < 300 ms, search < 100 ms, retry of 1,000 rows < 10 s.
The rows live in their own database (``fulldb_bench_admin``) and are reused by
later runs unless ``--refill`` is given.

    python bench/admin.py [--rows 1000000] [--refill] [--repeat 7] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.reexec_in_venv()

DB_NAME = "fulldb_bench_admin"
QUEUE = "bench_admin"
VAR_DIR = "/tmp/fulldb-bench-admin"
CHANGELIST_TARGET_MS = 300.0
SEARCH_TARGET_MS = 100.0
RETRY_TARGET_S = 10.0
RETRY_ROWS = 1000
RETRY_TASK = "bench.admin.retry_me"
NAMES = [f"shop.tasks.job_{i:02d}" for i in range(19)] + ["reports.tasks.rare_nightly"]

# ids follow time: row g of N was submitted (N - g) / N * 7 days ago.
FILL_SQL = f"""
INSERT INTO {_common.TASK_TABLE} (
    task_id, task, status, args, kwargs, replayable, queue, exchange, routing_key,
    hostname, retries, result, content_type, content_encoding, traceback,
    periodic_task_name, eta, date_submitted, date_started, date_done, date_modified
)
SELECT
    md5(s.g::text)::uuid::text,
    CASE WHEN s.g %% 1000 = 7 THEN '{NAMES[-1]}'
         ELSE 'shop.tasks.job_' || lpad((s.g %% 19)::text, 2, '0') END,
    s.status,
    jsonb_build_array(s.g, 'order-' || s.g),
    jsonb_build_object('user_id', s.g %% 5000),
    true,
    '{QUEUE}', '{QUEUE}', '{QUEUE}',
    CASE WHEN s.status IN ('SUCCESS', 'FAILURE', 'STARTED')
         THEN 'worker' || (1 + s.g %% 8) || '@bench' END,
    0,
    CASE WHEN s.status = 'SUCCESS' THEN (2 * s.g)::text
         WHEN s.status = 'FAILURE'
         THEN '{{"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}}'
    END,
    'application/json', 'utf-8',
    CASE WHEN s.status = 'FAILURE' THEN 'Traceback (most recent call last):\nValueError: boom' END,
    CASE WHEN s.g %% 20 = 0 THEN 'periodic-' || (s.g %% 40 / 20) END,
    CASE WHEN s.status = 'SCHEDULED' THEN s.ts + interval '8 days' END,
    s.ts,
    CASE WHEN s.status IN ('SUCCESS', 'FAILURE', 'STARTED') THEN s.ts + interval '1 second' END,
    CASE WHEN s.status IN ('SUCCESS', 'FAILURE') THEN s.ts + interval '2 seconds' END,
    s.ts + interval '2 seconds'
FROM (
    SELECT
        g,
        CASE
            WHEN g %% 100 < 90 THEN 'SUCCESS'
            WHEN g %% 100 < 93 THEN 'FAILURE'
            ELSE (ARRAY['PENDING', 'STARTED', 'RETRY', 'SCHEDULED'])[1 + (g %% 100 - 93) %% 4]
        END AS status,
        now() - (%s - g) * (interval '7 days' / %s) AS ts
    FROM generate_series(1, %s) AS g
) AS s
"""

DCR_FILL_SQL = f"""
INSERT INTO {_common.DCR_TABLE} (
    task_id, task_name, task_args, task_kwargs, status, worker, content_type,
    content_encoding, result, date_created, date_started, date_done, traceback, meta,
    periodic_task_name
)
SELECT
    md5(s.g::text)::uuid::text,
    CASE WHEN s.g %% 1000 = 7 THEN '{NAMES[-1]}'
         ELSE 'shop.tasks.job_' || lpad((s.g %% 19)::text, 2, '0') END,
    '"(' || s.g || ', ''order-' || s.g || ''')"',
    '"{{''user_id'': ' || (s.g %% 5000) || '}}"',
    s.status,
    'worker' || (1 + s.g %% 8) || '@bench',
    'application/json', 'utf-8',
    (2 * s.g)::text,
    s.ts, s.ts + interval '1 second', s.ts + interval '2 seconds',
    NULL, '{{"children": []}}',
    CASE WHEN s.g %% 20 = 0 THEN 'periodic-' || (s.g %% 40 / 20) END
FROM (
    SELECT
        g,
        CASE WHEN g %% 100 < 90 THEN 'SUCCESS' WHEN g %% 100 < 93 THEN 'FAILURE'
             ELSE 'PENDING' END AS status,
        now() - (%s - g) * (interval '7 days' / %s) AS ts
    FROM generate_series(1, %s) AS g
) AS s
"""


def cursor():
    from django.db import connection

    return connection.cursor()


def count(table: str) -> int:
    with cursor() as c:
        c.execute(f"SELECT COUNT(*) FROM {table}")
        return c.fetchone()[0]


def fill(table: str, sql: str, rows: int, refill: bool) -> dict:
    existing = count(table)
    if existing >= rows and not refill:
        return {"filled": False, "rows": existing, "seconds": 0.0}
    started = time.perf_counter()
    with cursor() as c:
        c.execute(f"TRUNCATE {table}")
        c.execute(sql, [rows, rows, rows])
        # A bulk load is followed by VACUUM in practice (visibility map, hint bits).
        c.execute(f"VACUUM ANALYZE {table}")
    return {"filled": True, "rows": count(table), "seconds": time.perf_counter() - started}


def superuser_client():
    from django.contrib.auth import get_user_model
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    return client


def timed_get(client, url: str, repeat: int) -> dict:
    """Median wall time of GET ``url`` (after one warm-up), with its SQL statements."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    response = client.get(url)
    if response.status_code != 200:
        raise SystemExit(f"GET {url} -> {response.status_code}")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        client.get(url)
        times.append((time.perf_counter() - t0) * 1000)
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    statements = [q["sql"] for q in queries]
    slowest = max(queries, key=lambda q: float(q["time"]))
    plans = [plan_facts(sql) for sql in statements if f'FROM "{_common.TASK_TABLE}"' in sql]
    full_counts = [s for s in statements if "COUNT(" in s.upper() and "LIMIT" not in s.upper()]
    distinct = [s for s in statements if "DISTINCT" in s.upper()]
    return {
        "url": url,
        "median_ms": _common.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "statements": len(statements),
        "slowest_ms": float(slowest["time"]) * 1000,
        "slowest_sql": slowest["sql"][:300],
        "full_counts": len(full_counts),
        "distinct": len(distinct),
        "indexes": sorted({name for plan in plans for name in plan["indexes"]}),
        "seq_scan": any(plan["seq_scan"] for plan in plans),
    }


def plan_facts(sql: str) -> dict:
    """Indexes used and whether the task table is scanned, from EXPLAIN of a logged statement."""
    import re

    if not sql.lstrip().upper().startswith("SELECT"):
        return {"indexes": [], "seq_scan": False}
    with cursor() as c:
        c.execute("EXPLAIN " + sql.replace("%", "%%"))
        text = "\n".join(row[0] for row in c.fetchall())
    return {
        "indexes": re.findall(r"Index (?:Only )?Scan(?: Backward)? (?:using|on) (\w+)", text),
        "seq_scan": bool(re.search(rf"Seq Scan on {_common.TASK_TABLE}\b", text)),
    }


def admin_url(app_label: str, model: str, **params: str) -> str:
    from urllib.parse import urlencode

    from django.urls import reverse

    url = reverse(f"admin:{app_label}_{model}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def page_cases(task_id: str) -> list[tuple[str, str, str, dict]]:
    """(kind, label, app/model, params) of every page measured."""
    ours, dcr = "django_celery_fulldbresult/taskresultmeta", "django_celery_results/taskresult"
    return [
        ("changelist", "default (newest first)", ours, {}),
        ("changelist", "state = FAILURE", ours, {"status": "FAILURE"}),
        ("changelist", "state = RETRY", ours, {"status": "RETRY"}),
        ("changelist", f"task name = {NAMES[-1]}", ours, {"task": NAMES[-1]}),
        ("changelist", "periodic task = periodic-1", ours, {"periodic_task_name": "periodic-1"}),
        ("changelist", "submitted in the last hour", ours, {"submitted": "1h"}),
        ("changelist", "stale for 1 hour", ours, {"stale": "3600"}),
        ("search", "exact task id", ours, {"q": task_id}),
        ("search", "name prefix 'shop.tasks.' (95 % of rows)", ours, {"q": "shop.tasks."}),
        ("search", "name prefix 'reports.' (0.1 % of rows)", ours, {"q": "reports."}),
        ("dcr changelist", "default", dcr, {}),
        ("dcr changelist", "state = FAILURE", dcr, {"status__exact": "FAILURE"}),
        ("dcr changelist", f"task name = {NAMES[-1]}", dcr, {"task_name": NAMES[-1]}),
        ("dcr search", "exact task id", dcr, {"q": task_id}),
        ("dcr search", "'reports.'", dcr, {"q": "reports."}),
    ]


def measure_pages(client, repeat: int, with_dcr: bool) -> list[dict]:
    from django_celery_fulldbresult.models import TaskResultMeta

    task_id = TaskResultMeta.objects.filter(id=500_000).values_list("task_id", flat=True).first()
    results = []
    for kind, label, target, params in page_cases(task_id or "missing"):
        if kind.startswith("dcr") and not with_dcr:
            continue
        app_label, model = target.split("/")
        case = timed_get(client, admin_url(app_label, model, **params), repeat)
        results.append({"kind": kind, "label": label, **case})
        print(f"[admin] {kind:15} {label:45} {case['median_ms']:8.1f} ms", flush=True)
    return results


def purge_queue(app) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_declare(QUEUE, durable=True, auto_delete=False)
        conn.default_channel.queue_purge(QUEUE)


def queued(app) -> int:
    with app.connection_for_write() as conn:
        return conn.default_channel.queue_declare(QUEUE, passive=True).message_count


def measure_retry(client, app) -> dict:
    """Retry 1,000 FAILURE rows selected across a filter, through the admin action."""
    from django.utils import timezone

    from django_celery_fulldbresult.models import TaskResultMeta

    TaskResultMeta.objects.filter(task=RETRY_TASK).delete()
    now = timezone.now()
    originals = [
        TaskResultMeta(
            task_id=f"bench-retry-{i}",
            task=RETRY_TASK,
            status="FAILURE",
            args=[i, {"order": f"order-{i}"}],
            kwargs={"user_id": i},
            options={"headers": {"tenant": "bench"}, "time_limit": 60},
            queue=QUEUE,
            exchange=QUEUE,
            routing_key=QUEUE,
            priority=3,
            date_submitted=now,
            date_modified=now,
        )
        for i in range(RETRY_ROWS)
    ]
    TaskResultMeta.objects.bulk_create(originals)
    purge_queue(app)
    first = TaskResultMeta.objects.filter(task=RETRY_TASK).values_list("pk", flat=True).first()
    url = admin_url(
        "django_celery_fulldbresult", "taskresultmeta", task=RETRY_TASK, status="FAILURE"
    )
    data = {
        "action": "retry_tasks",
        "_selected_action": [first],
        "select_across": "1",
        "index": "0",
    }
    t0 = time.perf_counter()
    page = client.post(url, data)
    confirm_ms = (time.perf_counter() - t0) * 1000
    if b"Yes, retry 1000 tasks" not in page.content:
        raise SystemExit("the confirmation page does not offer to retry 1000 tasks")
    data.pop("index")
    data["post"] = "yes"
    t0 = time.perf_counter()
    response = client.post(url, data)
    retry_s = time.perf_counter() - t0
    copies = TaskResultMeta.objects.filter(retried_from__startswith="bench-retry-").count()
    in_queue = queued(app)
    # Leave the table as it was for the next run.
    TaskResultMeta.objects.filter(retried_from__startswith="bench-retry-").delete()
    TaskResultMeta.objects.filter(task=RETRY_TASK).delete()
    purge_queue(app)
    print(f"[admin] retry {RETRY_ROWS} rows: {retry_s:.2f} s", flush=True)
    return {
        "rows": RETRY_ROWS,
        "confirm_ms": confirm_ms,
        "retry_s": retry_s,
        "status_code": response.status_code,
        "copies": copies,
        "messages_in_queue": in_queue,
        "target_met": retry_s < RETRY_TARGET_S and copies == RETRY_ROWS == in_queue,
    }


def explain_search(term: str) -> list[str]:
    """The plan of the admin's search statement (index use)."""
    from django.contrib.admin.sites import site
    from django.test import RequestFactory

    from django_celery_fulldbresult.models import TaskResultMeta

    model_admin = site._registry[TaskResultMeta]
    request = RequestFactory().get("/", {"q": term})
    queryset, _ = model_admin.get_search_results(
        request, TaskResultMeta.objects.only("id", "task_id"), term
    )
    sql, params = queryset.order_by("-id")[:100].query.sql_with_params()
    with cursor() as c:
        c.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        return [row[0] for row in c.fetchall()]


def short(index: str) -> str:
    """Django's generated index names, shortened for the table."""
    return index.replace(_common.TASK_TABLE, "t").replace(_common.DCR_TABLE, "dcr")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--refill", action="store_true", help="refill even if already filled")
    parser.add_argument("--repeat", type=int, default=7, help="timed requests per page")
    parser.add_argument("--no-dcr", action="store_true", help="skip django-celery-results")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    _common.setup(DB_NAME, queue=QUEUE, var_dir=VAR_DIR)
    from celery import current_app

    filled = fill(_common.TASK_TABLE, FILL_SQL, args.rows, args.refill)
    print(f"[admin] task table: {filled}", flush=True)
    dcr_filled = None
    if not args.no_dcr:
        dcr_filled = fill(_common.DCR_TABLE, DCR_FILL_SQL, args.rows, args.refill)
        print(f"[admin] django-celery-results table: {dcr_filled}", flush=True)
    client = superuser_client()
    pages = measure_pages(client, args.repeat, not args.no_dcr)
    retry = measure_retry(client, current_app)
    plans = {term: explain_search(term) for term in ("reports.", "shop.tasks.")}

    def verdict(case: dict) -> str:
        if case["kind"].startswith("dcr"):
            return ""
        target = SEARCH_TARGET_MS if case["kind"] == "search" else CHANGELIST_TARGET_MS
        return f"{'<' if case['median_ms'] < target else '>='} {target:.0f}"

    rows = [
        [
            case["kind"],
            case["label"],
            f"{case['median_ms']:.1f} ({case['min_ms']:.0f}-{case['max_ms']:.0f})",
            verdict(case),
            case["statements"],
            f"{case['slowest_ms']:.1f}",
            f"{case['full_counts']} / {case['distinct']}",
            f"{', '.join(short(i) for i in case['indexes']) or '-'}"
            f"{' / **seq scan**' if case['seq_scan'] else ''}",
        ]
        for case in pages
    ]
    ours = [c for c in pages if not c["kind"].startswith("dcr")]
    met = all(verdict(c).startswith("<") for c in ours) and retry["target_met"]
    fill_text = (
        f"filled {filled['rows']:,} rows in {filled['seconds']:.0f} s"
        if filled["filled"]
        else f"reused {filled['rows']:,} rows (use --refill to rebuild)"
    )
    sections = [
        {
            "title": f"Admin at {filled['rows']:,} rows (PostgreSQL, Django test client)",
            "text": (
                f"{fill_text}; django-celery-results: "
                f"{dcr_filled['rows'] if dcr_filled else 0:,} rows. Whole requests as a logged-in "
                f"superuser, median of {args.repeat} after one warm-up (min-max)."
            ),
            "headers": [
                "page",
                "case",
                "ms median (min-max)",
                "target",
                "SQL statements",
                "slowest statement ms",
                "full COUNT / DISTINCT",
                "task-table indexes (EXPLAIN)",
            ],
            "rows": rows,
            "notes": [
                f"Retry of {retry['rows']:,} rows through the admin action (select across a "
                f"filter): confirmation page {retry['confirm_ms']:.0f} ms, confirmed POST "
                f"**{retry['retry_s']:.2f} s** (target < {RETRY_TARGET_S:.0f} s); "
                f"{retry['copies']:,} copies recorded, {retry['messages_in_queue']:,} messages "
                "in the queue",
                f"all targets met: **{'yes' if met else 'NO'}**",
            ],
            "code": "\n\n".join(
                f"EXPLAIN (ANALYZE, BUFFERS) -- admin search {term!r}\n" + "\n".join(plan)
                for term, plan in plans.items()
            ),
        }
    ]
    result = {
        "name": "admin",
        "sections": sections,
        "fill": filled,
        "dcr_fill": dcr_filled,
        "pages": pages,
        "retry": retry,
        "targets_met": met,
    }
    _common.finish("admin", result, args.json_out)
    return result


if __name__ == "__main__":
    main()
