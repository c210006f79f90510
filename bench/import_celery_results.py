"""Time ``manage.py import_celery_results`` on 1,000,000 django-celery-results rows.

    python bench/import_celery_results.py --stack pg-rabbit
    python bench/import_celery_results.py --stack maria-redis
    python bench/import_celery_results.py --stack pg-rabbit --rows 20000   # a smoke test

In a fresh database (dropped and created: ``--db-name``, default ``fulldb_import_bench``,
migrated), fills django-celery-results' ``TaskResult`` table with ``--rows`` rows as its
backend writes them with ``result_extended`` and the JSON serializer (``bulk_create``,
10,000 per statement): argument reprs of about 100 bytes each, JSON encoded; a JSON result
of about 120 bytes; 5 % FAILURE with Celery's exception dict and a 1.5 kB traceback; 10 %
with a periodic task name; ``{"children": []}`` as meta. Then runs the import in a child
process (``manage.py import_celery_results --batch-size N``) and reports its wall time,
rows/s and peak RSS (``ru_maxrss`` of that child alone, from ``os.wait4``: the rusage
``resource.getrusage(RUSAGE_CHILDREN)`` sums up, per child; on Linux a child's peak starts
from its parent's size at the fork, so the filling is done by another child and this
process stays small until the imports are done), then two re-runs: one that continues after
the last imported row (nothing left: the resume check alone), and
one with ``--from-start`` (every row read again, none written). Finally it checks that the
task table holds one row per source row. The database is kept (``--drop`` drops it).

Isolation: its own database, var dir (``/tmp/fulldb-import-bench``) and queue; the fill and
the import never touch the tests' or the demo's databases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VAR_DIR = "/tmp/fulldb-import-bench"

TRACEBACK = (
    "Traceback (most recent call last):\n"
    + "".join(
        f'  File "/srv/app/billing/step_{i}.py", line {10 + i}, in run_step_{i}\n'
        f"    result = handler_{i}(invoice, customer, options=options)\n"
        for i in range(12)
    )
    + "ValueError: the payment provider refused the charge (code 402)\n"
)


def environment(args: argparse.Namespace) -> dict[str, str]:
    if not args.db_name.startswith("fulldb_import_"):
        raise SystemExit("--db-name must start with fulldb_import_ (the bench drops it)")
    env = dict(os.environ)
    for name in ("FULLDB_TEST_DB", "FULLDB_BACKEND", "FULLDB_SCHEDULE_ETA"):
        env.pop(name, None)
    env.update(
        FULLDB_STACK=args.stack,
        FULLDB_DB_NAME=args.db_name,
        FULLDB_VAR_DIR=VAR_DIR,
        FULLDB_QUEUE="fulldb_import_bench",
        FULLDB_REDIS_DB=env.get("FULLDB_REDIS_DB", "9"),
        FULLDB_DEBUG="0",  # DEBUG keeps every query in memory: measure production
        DJANGO_SETTINGS_MODULE="testproject.settings",
        PYTHONPATH=str(REPO),
    )
    return env


def recreate_database(stack: str, name: str) -> None:
    if stack == "pg-rabbit":
        import psycopg

        with psycopg.connect(
            dbname="postgres", host="127.0.0.1", user="postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
    elif stack == "maria-redis":
        import MySQLdb

        conn = MySQLdb.connect(host="127.0.0.1", user="root", passwd="")
        cursor = conn.cursor()
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.close()
    else:
        raise SystemExit("--stack: pg-rabbit or maria-redis")


def fill(rows: int) -> float:
    """``rows`` TaskResult rows as django-celery-results' backend writes them."""
    from django.utils import timezone
    from django_celery_results.models import TaskResult

    started = time.monotonic()
    now = timezone.now()
    batch: list = []
    for i in range(rows):
        failed = i % 20 == 7
        argsrepr = (
            f"({i}, 'customer-{i % 9973:06d}', 'invoice-{uuid.uuid4().hex[:24]}', 'EUR', 129.95)"
        )
        kwargsrepr = f"{{'channel': 'web', 'retry_policy': 'standard', 'batch': {i // 1000}}}"
        result = (
            {
                "exc_type": "ValueError",
                "exc_message": ["the payment provider refused the charge (code 402)"],
                "exc_module": "builtins",
            }
            if failed
            else {"invoice": f"invoice-{i}", "status": "paid", "amount": "129.95", "lines": 3}
        )
        done = now - timedelta(seconds=(rows - i) * 2)
        batch.append(
            TaskResult(
                task_id=str(uuid.uuid4()),
                task_name=f"billing.tasks.charge_{i % 7}",
                periodic_task_name="nightly billing" if i % 10 == 3 else None,
                task_args=json.dumps(argsrepr),
                task_kwargs=json.dumps(kwargsrepr),
                status="FAILURE" if failed else "SUCCESS",
                worker=f"celery@worker-{i % 4}",
                content_type="application/json",
                content_encoding="utf-8",
                result=json.dumps(result),
                date_started=done - timedelta(seconds=1),
                traceback=TRACEBACK if failed else None,
                meta='{"children": []}',
            )
        )
        if len(batch) == 10_000:
            TaskResult.objects.bulk_create(batch)
            batch = []
            print(f"\rfilled {i + 1:,} of {rows:,}", end="", file=sys.stderr, flush=True)
    if batch:
        TaskResult.objects.bulk_create(batch)
    print(file=sys.stderr)
    return time.monotonic() - started


def timed_import(env: dict[str, str], *options: str) -> dict:
    """Run the command in a child process: wall time, peak RSS, its report."""
    command = [sys.executable, "testproject/manage.py", "import_celery_results", *options]
    out_path, err_path = Path(VAR_DIR, "import.out"), Path(VAR_DIR, "import.err")
    started = time.monotonic()
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out_file, stderr=err_file)
        # wait4: the resources of this child alone (its peak RSS, in KiB on Linux).
        _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = out_path.read_text(), err_path.read_text()
    peak_kib = usage.ru_maxrss
    if proc.returncode:
        raise SystemExit(f"import failed ({proc.returncode}):\n{err[-3000:]}")
    return {
        "command": " ".join(["python", "testproject/manage.py", "import_celery_results", *options]),
        "seconds": elapsed,
        "peak_rss_mib": peak_kib / 1024,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "stdout": out.strip(),
        "stderr_tail": err.strip().splitlines()[-2:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["pg-rabbit", "maria-redis"], required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--db-name", default="fulldb_import_bench")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--fill-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    env = environment(args)
    load_before = os.getloadavg()
    os.environ.clear()
    os.environ.update(env)
    Path(VAR_DIR).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    if args.fill_only:  # the child process that fills (see below)
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        fill_seconds = fill(args.rows)
        print(json.dumps({"fill_seconds": fill_seconds}))
        return

    recreate_database(args.stack, args.db_name)
    # Filled by a child process, and Django loaded here only after the imports: a child's
    # peak RSS (ru_maxrss) starts from its parent's size at the fork, which stays small.
    filled = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--fill-only"],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    fill_seconds = json.loads(filled.stdout.strip().splitlines()[-1])["fill_seconds"]
    print(f"fill: {args.rows:,} rows in {fill_seconds:,.1f} s", file=sys.stderr)
    batch = ["--batch-size", str(args.batch_size)]
    parent_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = {
        "import": timed_import(env, *batch),
        "again (resume: nothing left)": timed_import(env, *batch),
        "again --from-start (all read, none written)": timed_import(env, *batch, "--from-start"),
    }

    import django as dj

    dj.setup()
    from django.db import connection

    from django_celery_fulldbresult.models import TaskResultMeta

    imported = TaskResultMeta.objects.count()
    import django_celery_results

    report = {
        "stack": args.stack,
        "server": connection.cursor().connection.get_server_info()
        if connection.vendor == "mysql"
        else connection.cursor().connection.info.server_version,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "fill_seconds": round(fill_seconds, 1),
        "task_table_rows": imported,
        "versions": {
            "python": sys.version.split()[0],
            "django": dj.get_version(),
            "django-celery-results": django_celery_results.__version__,
        },
        "load_average_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "bench_parent_peak_rss_mib_at_the_imports": round(parent_kib / 1024, 1),
        "runs": {},
    }
    for name, run in runs.items():
        report["runs"][name] = {
            "seconds": round(run["seconds"], 1),
            "rows_per_s": round(args.rows / run["seconds"]),
            "peak_rss_mib": round(run["peak_rss_mib"], 1),
            "cpu_seconds_of_the_command": round(run["cpu_seconds"], 1),
            "command": run["command"],
            "report": run["stdout"].splitlines(),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if imported != args.rows:
        raise SystemExit(f"the task table holds {imported:,} rows, not {args.rows:,}")
    if args.drop:
        connection.close()
        recreate_database(args.stack, args.db_name)


if __name__ == "__main__":
    main()
