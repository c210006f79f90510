"""``python -m soak``: the soak and fault scenarios on PostgreSQL + RabbitMQ and MariaDB + Redis.

    python -m soak                         # every scenario, both stacks, full size
    python -m soak --stacks pg-rabbit --only 1,4 --load-tasks 10000
    python -m soak --small                 # the pytest sizes (a smoke run)

Prints one line per scenario with its figures and PASS/FAIL; exits 1 if any
failed. Loopback only; bounded (every wait has a time limit); the services are
never stopped (outages go through soak/faultproxy.py). Isolation: the database
``$FULLDB_DB_NAME`` (default ``fulldb_soak``, emptied at the start), the queue
``$FULLDB_QUEUE`` (default ``soak``), Redis database ``$FULLDB_REDIS_DB`` and
the folder ``$FULLDB_VAR_DIR`` (default ``/tmp/fulldb-soak``), where each run
leaves its process logs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACKS = ("pg-rabbit", "maria-redis")
#: Names the tests, the demo and the benchmarks use: the soak never empties them.
FORBIDDEN_DBS = frozenset({"fulldbresult", "fulldb_bench", "fulldb_bench_sched", "postgres"})


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9", help="Scenario numbers.")
    parser.add_argument("--small", action="store_true", help="The pytest sizes.")
    parser.add_argument("--load-tasks", type=int, default=None, help="Scenario 1's task count.")
    parser.add_argument("--outage-seconds", type=float, default=None)
    parser.add_argument("--stack", default=None, help=argparse.SUPPRESS)  # one stack, in-process
    return parser.parse_args(argv)


def isolation_env(stack: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FULLDB_TEST_DB", None)
    env.pop("FULLDB_SCHEDULE_ETA", None)
    env.setdefault("FULLDB_DB_NAME", "fulldb_soak")
    env.setdefault("FULLDB_QUEUE", "soak")
    env.setdefault("FULLDB_VAR_DIR", "/tmp/fulldb-soak")
    path = [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update(
        FULLDB_STACK=stack,
        FULLDB_DEBUG="0",  # DEBUG keeps every query in memory
        DJANGO_SETTINGS_MODULE="testproject.settings",
        PYTHONPATH=os.pathsep.join(dict.fromkeys(path)),
    )
    name = env["FULLDB_DB_NAME"]
    if name in FORBIDDEN_DBS or name.startswith("test_"):
        raise SystemExit(f"refusing to empty the database {name!r}: set FULLDB_DB_NAME")
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.stack:
        return run_stack(args)
    forwarded = [f"--only={args.only}", *(["--small"] if args.small else [])]
    if args.load_tasks:
        forwarded.append(f"--load-tasks={args.load_tasks}")
    if args.outage_seconds:
        forwarded.append(f"--outage-seconds={args.outage_seconds}")
    lines: list[str] = []
    failed = False
    for stack in args.stacks.split(","):
        print(f"== {stack}", flush=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "soak.run", *forwarded, "--stack", stack],
            cwd=REPO,
            env=isolation_env(stack),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("SOAK "):
                lines.append(line.rstrip())
        try:
            failed |= proc.wait() != 0
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(60)
            raise
    print("\nSummary:")
    for line in lines:
        print(line)
    return 1 if failed else 0


# -- one stack, in this process ---------------------------------------------------------


def ensure_database(stack: str, name: str) -> None:
    if stack == "pg-rabbit":
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", user=os.environ.get("PGUSER", "postgres"), dbname="postgres",
            autocommit=True, connect_timeout=10,
        ) as conn:  # fmt: skip
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
    elif stack == "maria-redis":
        import MySQLdb

        conn = MySQLdb.connect(host="127.0.0.1", user="root", passwd="", connect_timeout=10)
        try:
            conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()


def empty_tables() -> None:
    from django.db import connection

    from django_celery_fulldbresult.models import TaskResultMeta, WorkerHeartbeat
    from testproject.demo.models import Run

    tables = [m._meta.db_table for m in (TaskResultMeta, WorkerHeartbeat, Run)]
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"TRUNCATE TABLE {connection.ops.quote_name(table)}")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM becomes SystemExit: every ``finally`` stops the workers and senders it started.
    raise SystemExit(128 + signum)


def run_stack(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    env = isolation_env(args.stack)
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    ensure_database(args.stack, env["FULLDB_DB_NAME"])
    import django

    django.setup()
    from django.core.management import call_command

    from . import harness, scenarios

    call_command("migrate", verbosity=0, interactive=False)
    empty_tables()
    sizes = harness.Sizes.small() if args.small else harness.Sizes.full()
    if args.load_tasks:
        sizes.load_tasks = args.load_tasks
    if args.outage_seconds:
        sizes.outage_seconds = args.outage_seconds
    work_dir = Path(env["FULLDB_VAR_DIR"]) / f"soak-{args.stack}-{time.strftime('%Y%m%d-%H%M%S')}"
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = harness.Context(
        stack=args.stack,
        queue=env["FULLDB_QUEUE"],
        work_dir=work_dir,
        child_env=dict(env),
        sizes=sizes,
    )
    print(f"logs: {work_dir}", flush=True)
    failed = False
    for key in args.only.split(","):
        outcome = scenarios.run_scenario(key.strip(), ctx)
        failed |= not outcome.ok
        print(f"SOAK {args.stack:<11} {outcome.line()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
