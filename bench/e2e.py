"""End-to-end tasks/s through a real worker (RabbitMQ + PostgreSQL).

For each configuration a worker subprocess is started
(``celery -A testproject worker -P prefork -c 2 -Q bench``), warmed up, and
``--tasks`` (default 2000) ``add`` tasks are published; the time runs from the
first publish until every task's row is SUCCESS (a COUNT every 0.2 s). Each
configuration is measured ``--rounds`` times (default 3) with the same worker
and the median is reported. The worker is stopped with SIGTERM and waited for,
whatever happens (Ctrl-C included).

Configurations: ours and django-celery-results, each with Celery's default
connection handling (``CELERY_DB_REUSE_MAX`` unset: the Django fixup closes the
connections around every task) and with ``CELERY_DB_REUSE_MAX=1000``; ours with
``CELERY_DB_REUSE_MAX=1000`` and RUN_ONCE; and ours with ``CELERY_DB_REUSE_MAX=1000``
running Django's ``@task`` ``testproject.demo.jobs.add`` (``jobs.add.enqueue(i, i)``
through ``django_tasks.CeleryBackend``, to Django's ``"default"`` queue, which is the
Celery app's default queue: ``bench``, the one the worker consumes) instead of the Celery
task ``add``: the same worker setup, measured the same way; and the ceiling: the same worker
running ``add`` with ``ignore_result=True`` and publish tracking off (no row at all; its end is
seen in the worker's ``inspect stats`` totals). Two more configurations say where the distance
to the ceiling goes: ours with one write per task (publish tracking off and
``CELERY_TASK_TRACK_STARTED`` off: only the final state is stored), and Celery's Redis result
backend in the worker (``CELERY_RESULT_BACKEND=redis://127.0.0.1:6379/12``, the fastest store
Celery ships), also storing only the final state; its end is seen as the ceiling's.

    python bench/e2e.py [--tasks 2000] [--rounds 3] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

POLL_INTERVAL = 0.2
WORKER_START_TIMEOUT = 90.0
PIDFILE = Path(_common.VAR_DIR) / "e2e-worker.pid"
NODE_PREFIX = "fulldb-bench-e2e"
#: The Redis result backend's database (the wait benchmark has 11).
REDIS_RESULTS = "redis://127.0.0.1:6379/12"


@dataclass(frozen=True)
class Config:
    backend: str  # "ours" | "django-celery-results" | "redis"
    reuse_max: str  # "" (Celery's default) | "1000"
    #: ours only: the publisher writes a PENDING row per task (the testproject's setting).
    track_publish: bool = True
    #: ours only: RUN_ONCE, the worker takes each attempt in its row before running it.
    run_once: bool = False
    #: ours only: Django's @task ``jobs.add`` (``enqueue``) instead of the Celery task ``add``.
    django_task: bool = False
    #: ``apply_async(..., ignore_result=True)``, publish tracking off: the worker writes no row,
    #: the ceiling a result backend can approach (done is counted by the worker's stats).
    ignore_result: bool = False
    #: ``CELERY_TASK_TRACK_STARTED`` (the testproject's is on): a STARTED write per task.
    track_started: bool = True

    @property
    def counted_by_worker(self) -> bool:
        """No row to count: the worker's ``inspect stats`` totals say when it is done."""
        return self.ignore_result or self.backend == "redis"

    @property
    def label(self) -> str:
        reuse = (
            "default (close per task)" if not self.reuse_max else f"DB_REUSE_MAX={self.reuse_max}"
        )
        untracked = (
            ", publish tracking off" if self.backend == "ours" and not self.track_publish else ""
        )
        run_once = ", RUN_ONCE" if self.run_once else ""
        django_task = ", Django @task (enqueue)" if self.django_task else ""
        if self.ignore_result:
            return f"no result writes (ignore_result=True, the ceiling), {reuse}"
        if not self.track_started:
            store = "Celery's Redis result backend" if self.backend == "redis" else "ours"
            return f"{store}, {reuse}, one write per task (publish tracking, track_started off)"
        return f"{self.backend}, {reuse}{untracked}{run_once}{django_task}"

    @property
    def slug(self) -> str:
        backend = {"django-celery-results": "dcr", "redis": "redis"}.get(self.backend, "ours")
        untracked = "" if self.track_publish else "-untracked"
        run_once = "-runonce" if self.run_once else ""
        django_task = "-djangotask" if self.django_task else ""
        ignored = "-ignoreresult" if self.ignore_result else ""
        unstarted = "" if self.track_started else "-nostarted"
        return (
            f"{backend}-reuse{self.reuse_max or 'default'}{untracked}{run_once}{django_task}"
            f"{ignored}{unstarted}"
        )

    @property
    def env(self) -> dict[str, str]:
        backend = "django-db" if self.backend == "django-celery-results" else "fulldb"
        env = {"FULLDB_BACKEND": backend, "FULLDB_DB_REUSE_MAX": self.reuse_max}
        if self.run_once:
            env["FULLDB_RUN_ONCE"] = "1"
        if not self.track_started:
            env["FULLDB_TRACK_STARTED"] = "0"
        if self.backend == "redis":
            # The worker's only: Celery reads it before the project's settings. The
            # publisher keeps ours (a Redis backend there would subscribe to every task sent).
            env["CELERY_RESULT_BACKEND"] = REDIS_RESULTS
        return env


CONFIGS = [
    Config("ours", ""),
    Config("django-celery-results", ""),
    Config("ours", "1000"),
    Config("django-celery-results", "1000"),
    # The run-once check's cost: the row above with RUN_ONCE (one more UPDATE per task).
    Config("ours", "1000", run_once=True),
    # Django's @task on the same worker setup as ours, DB_REUSE_MAX=1000 (its anchor).
    Config("ours", "1000", django_task=True),
    # The ceiling: the same worker and tasks, nothing stored.
    Config("ours", "1000", track_publish=False, ignore_result=True),
    # Toward the ceiling: one write per task (the final state), ours and Celery's Redis backend.
    Config("ours", "1000", track_publish=False, track_started=False),
    Config("redis", "1000", track_publish=False, track_started=False),
]
#: --untracked: ours without publish tracking, to tell the backend's share from
#: the publisher's (django-celery-results writes nothing at publish time).
UNTRACKED_CONFIGS = [Config("ours", "", False), Config("ours", "1000", False)]


def worker_command(node: str) -> list[str]:
    return _common.worker_command(_common.QUEUE, node, 2)


# -- worker process ---------------------------------------------------------


class Worker(_common.WorkerProcess):
    def __init__(self, config: Config, log_path: Path) -> None:
        self.config = config
        self.node = f"{NODE_PREFIX}-{os.getpid()}@127.0.0.1"
        super().__init__(
            worker_command(self.node), _common.bench_env(**config.env), log_path, PIDFILE
        )


# -- broker and database helpers -------------------------------------------


def purge_queue(app) -> int:
    queue = app.amqp.queues[_common.QUEUE]
    with app.connection_for_write() as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        return bound.purge() or 0


def flush_redis_results() -> None:
    import redis

    redis.Redis.from_url(REDIS_RESULTS).flushdb()


def success_count(config: Config) -> int:
    from django.db import connection

    table = _common.DCR_TABLE if config.backend == "django-celery-results" else _common.TASK_TABLE
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE status = 'SUCCESS'")
        return cursor.fetchone()[0]


def last_done(config: Config) -> float | None:
    from django.db import connection

    table = _common.DCR_TABLE if config.backend == "django-celery-results" else _common.TASK_TABLE
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT EXTRACT(EPOCH FROM MAX(date_done)) FROM {table}")
        value = cursor.fetchone()[0]
    return None if value is None else float(value)


def processed(worker: Worker) -> int:
    """Tasks the worker has run since it started (its ``inspect stats`` totals): the count
    of the ``ignore_result`` configuration, which leaves no row to count."""
    from testproject.celery_app import app

    replies = app.control.inspect([worker.node], timeout=1.0).stats() or {}
    return sum(replies.get(worker.node, {}).get("total", {}).values())


def wait_for(
    config: Config, worker: Worker, expected: int, timeout: float, before: int = 0
) -> float:
    """Poll until ``expected`` rows are SUCCESS (with ``ignore_result``: until the worker has
    run ``expected`` tasks more than ``before``); return the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        done = processed(worker) - before if config.counted_by_worker else success_count(config)
        now = time.monotonic()
        if done >= expected:
            return now
        worker.check()
        if now > deadline:
            raise TimeoutError(
                f"{config.label}: only {done}/{expected} tasks SUCCESS after {timeout:.0f} s; "
                f"worker log:\n{worker.log_tail()}"
            )
        time.sleep(POLL_INTERVAL)


def publish(task, count: int, offset: int = 0, **options) -> None:
    from testproject.celery_app import app

    with app.producer_or_acquire() as producer:
        for i in range(offset, offset + count):
            task.apply_async((i, i), producer=producer, **options)


def enqueue(job, count: int, offset: int = 0) -> None:
    """Django's ``job.enqueue`` (no producer to pass: each call takes one from the pool)."""
    for i in range(offset, offset + count):
        job.enqueue(i, i)


# -- one configuration --------------------------------------------------------


def run_config(config: Config, tasks: int, rounds: int, timeout: float) -> dict:

    from testproject.celery_app import app
    from testproject.demo import jobs
    from testproject.demo.tasks import add, noop

    # Publish tracking (a PENDING row per sent task, written by the publisher)
    # is part of ours; django-celery-results has nothing like it, so the
    # publisher does not pay for it there.
    _common.set_setting("TRACK_PUBLISH", config.backend == "ours" and config.track_publish)
    tables = (_common.TASK_TABLE, _common.DCR_TABLE)
    purged = purge_queue(app)
    _common.truncate(*tables)
    if config.backend == "redis":
        flush_redis_results()
    log_path = Path(_common.VAR_DIR) / f"e2e-worker-{config.slug}.log"
    worker = Worker(config, log_path)
    runs = []
    try:
        worker.start()
        # Warm-up: both pool processes import, connect and run a few tasks (Django's own
        # @task for its configuration: its first calls in a process set the backend up).
        if config.django_task:
            enqueue(jobs.add, 20)
        else:
            with app.producer_or_acquire() as producer:
                for _ in range(20):
                    noop.apply_async(producer=producer, ignore_result=config.ignore_result)
        wait_for(config, worker, 20, WORKER_START_TIMEOUT)
        for _ in range(rounds):
            _common.truncate(*tables)
            before = processed(worker) if config.counted_by_worker else 0
            cpu0 = _common.cpu_by_group(worker.proc.pid if worker.proc else None)
            wall0 = time.time()
            t0 = time.monotonic()
            if config.django_task:
                enqueue(jobs.add, tasks)
            else:
                publish(add, tasks, ignore_result=config.ignore_result)
            published = time.monotonic()
            seen = wait_for(config, worker, tasks, timeout, before)
            cpu1 = _common.cpu_by_group(worker.proc.pid if worker.proc else None)
            final = None if config.counted_by_worker else last_done(config)
            elapsed = seen - t0
            precise = (final - wall0) if final else float("nan")
            runs.append(
                {
                    "seconds": elapsed,
                    "tasks_per_s": tasks / elapsed,
                    "publish_seconds": published - t0,
                    "tasks_per_s_last_done": tasks / precise if precise > 0 else float("nan"),
                    "cpu_ms_per_task": {
                        group: (cpu1[group] - cpu0[group]) * 1000 / tasks for group in cpu1
                    },
                }
            )
            print(
                f"  {config.label}: {tasks / elapsed:,.0f} tasks/s "
                f"(publish {published - t0:.2f} s, total {elapsed:.2f} s)",
                file=sys.stderr,
            )
    finally:
        code = worker.stop()
        _common.set_setting("TRACK_PUBLISH", True)
    return {
        "label": config.label,
        "slug": config.slug,
        "backend": config.backend,
        "reuse_max": config.reuse_max,
        "track_publish": config.track_publish,
        "run_once": config.run_once,
        "django_task": config.django_task,
        "ignore_result": config.ignore_result,
        "track_started": config.track_started,
        "tasks_per_s": _common.median(r["tasks_per_s"] for r in runs),
        "tasks_per_s_last_done": _common.median(r["tasks_per_s_last_done"] for r in runs),
        "publish_seconds": _common.median(r["publish_seconds"] for r in runs),
        "cpu_ms_per_task": {
            group: _common.median(r["cpu_ms_per_task"][group] for r in runs)
            for group in runs[0]["cpu_ms_per_task"]
        },
        "runs": runs,
        "purged_before": purged,
        "worker_exit_code": code,
        "worker_log": str(log_path),
    }


def cpu_section(results: list[dict]) -> dict:
    """Where a task's time goes: CPU ms per task by process, for each configuration."""
    groups = list(_common.CPU_GROUPS)
    rows = []
    for r in results:
        cpu = r["cpu_ms_per_task"]
        if not cpu:
            continue
        rows.append([r["label"], *(f"{cpu[g]:.2f}" for g in groups), f"{sum(cpu.values()):.2f}"])
    return {
        "title": "Where a task's time goes: CPU ms per task by process (median of the rounds)",
        "headers": ["configuration", *groups, "total"],
        "rows": rows,
        "notes": [
            "from /proc between the first publish and the last task seen done: the worker's "
            "main process and its pool processes, every PostgreSQL server process (and what "
            "exited ones left to the postmaster), RabbitMQ, and the publishing process (its "
            "publish-tracking writer thread included); 2 cores in all: tasks/s cannot exceed "
            "2000 / total",
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per round")
    parser.add_argument(
        "--untracked",
        action="store_true",
        help="also run ours with publish tracking off (two more configurations)",
    )
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    _common.setup()
    _common.reap_leftover_worker(PIDFILE, NODE_PREFIX)
    results = []
    for config in CONFIGS + (UNTRACKED_CONFIGS if args.untracked else []):
        print(f"e2e: {config.label}", file=sys.stderr)
        results.append(run_config(config, args.tasks, args.rounds, args.timeout))
    _common.truncate(_common.TASK_TABLE, _common.DCR_TABLE)

    dcr = {r["reuse_max"]: r for r in results if r["backend"] == "django-celery-results"}
    rows = []
    ratios = {}
    for r in results:
        if r["backend"] == "ours" and not r["ignore_result"] and r["reuse_max"] in dcr:
            ratio = r["tasks_per_s"] / dcr[r["reuse_max"]]["tasks_per_s"]
            key = r["reuse_max"] or "default"
            key = key if r["track_publish"] else f"{key}, untracked"
            key = f"{key}, run_once" if r["run_once"] else key
            key = key if r.get("track_started", True) else f"{key}, one write"
            ratios[f"{key}, django_task" if r.get("django_task") else key] = ratio
            ratio_cell = f"**{ratio:.2f}x**"
        else:
            ratio_cell = ""
        rows.append(
            [
                r["label"],
                r["tasks_per_s"],
                r["tasks_per_s_last_done"],
                f"{r['publish_seconds']:.2f}",
                ", ".join(f"{x['tasks_per_s']:,.0f}" for x in r["runs"]),
                ratio_cell,
            ]
        )
    section = {
        "title": (
            f"End to end ({args.tasks} `add` tasks, prefork -c 2, RabbitMQ + PostgreSQL, "
            f"median of {args.rounds})"
        ),
        "headers": [
            "configuration",
            "tasks/s",
            "tasks/s (to last date_done)",
            "publish s",
            "tasks/s per round",
            "ours / d-c-r",
        ],
        "rows": rows,
        "notes": [
            "tasks/s: from the first publish until a COUNT (every 0.2 s) sees every row SUCCESS",
            "tasks/s (to last date_done): same start, ended by the newest date_done in the table "
            "(no polling granularity)",
            "ours publishes with publish tracking on (one PENDING insert per task in the "
            "publisher, as the testproject is configured) unless marked otherwise; "
            "django-celery-results has no such write. The publisher is one process on the "
            "same 2 cores as the worker: see `publish s`",
            "Django @task: `jobs.add.enqueue(i, i)` (Django's Tasks framework on "
            "`django_tasks.CeleryBackend`) writes each task's PENDING row before it returns "
            "(not written behind) and takes a producer from the pool per call; the worker runs "
            "it as the Celery task `testproject.demo.jobs.add`, with one `UPDATE ... RETURNING` "
            "of its row per attempt (the worker in `worker_ids`) and Django's task signals",
            "worker: `" + " ".join(worker_command(f"{NODE_PREFIX}-PID@127.0.0.1")[1:]) + "`",
        ],
    }
    plain = next((r for r in results if r["slug"] == "ours-reuse1000"), None)
    checked = next((r for r in results if r["slug"] == "ours-reuse1000-runonce"), None)
    if plain and checked:
        ratios["run_once / without"] = checked["tasks_per_s"] / plain["tasks_per_s"]
        section["notes"].append(
            f"RUN_ONCE costs {1 - ratios['run_once / without']:.1%} of end-to-end tasks/s "
            f"({checked['tasks_per_s']:,.0f} vs {plain['tasks_per_s']:,.0f}; one UPDATE per "
            "task in the worker's main process)"
        )
    ceiling = next((r for r in results if r["ignore_result"]), None)
    if plain and ceiling:
        ratios["ours / ceiling"] = plain["tasks_per_s"] / ceiling["tasks_per_s"]
        section["notes"].append(
            f"ours (DB_REUSE_MAX=1000) reaches **{ratios['ours / ceiling']:.2f}** of the "
            f"ceiling, the same worker storing nothing ({plain['tasks_per_s']:,.0f} vs "
            f"{ceiling['tasks_per_s']:,.0f} tasks/s; goal >= 0.9); the ceiling's end is seen "
            "by polling the worker's `inspect stats` totals every 0.2 s"
        )
    for slug, what in (
        ("ours-reuse1000-untracked-nostarted", "ours storing only the final state"),
        ("redis-reuse1000-untracked-nostarted", "Celery's Redis result backend, the same"),
    ):
        other = next((r for r in results if r["slug"] == slug), None)
        if other and ceiling:
            ratios[f"{slug} / ceiling"] = other["tasks_per_s"] / ceiling["tasks_per_s"]
            section["notes"].append(
                f"{what}: **{ratios[f'{slug} / ceiling']:.2f}** of the ceiling "
                f"({other['tasks_per_s']:,.0f} tasks/s)"
            )
    django_task = next((r for r in results if r["slug"] == "ours-reuse1000-djangotask"), None)
    if plain and django_task:
        ratios["django_task / plain"] = django_task["tasks_per_s"] / plain["tasks_per_s"]
        section["notes"].append(
            f"Django @task: {ratios['django_task / plain']:.2f}x the end-to-end tasks/s of the "
            f"plain Celery task in the same configuration ({django_task['tasks_per_s']:,.0f} vs "
            f"{plain['tasks_per_s']:,.0f}; publish {django_task['publish_seconds']:.2f} s vs "
            f"{plain['publish_seconds']:.2f} s)"
        )
    result = {
        "name": "e2e",
        "sections": [section, cpu_section(results)],
        "configs": results,
        "ratios": ratios,
    }
    _common.finish("e2e", result, args.json_out)
    return result


if __name__ == "__main__":
    main()
