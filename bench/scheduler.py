"""The database ETA scheduler against Celery's own ETA handling (RabbitMQ + PostgreSQL).

Four measurements in one run, in a database, a queue and a var dir of their own
(``fulldb_bench_sched``, ``bench_sched``, ``/tmp/fulldb-bench-sched``):

1. Worker memory: RSS (main process + pool child, from /proc) of a real
   ``celery -A testproject worker -P prefork -c 1 -Q bench_sched`` subprocess,
   idle, then after ``--tasks`` (default 100,000) ``add`` tasks are published
   with ``countdown=3600``: (a) native Celery ETA (the worker receives and holds
   every task; ``--prefetch-multiplier 65535`` starts at AMQP's largest
   prefetch count, each ETA task received raises it and kombu then lifts the
   limit; the measure waits until RabbitMQ reports them all unacknowledged and
   the worker is idle) vs (b) with the scheduler (``FULLDB_SCHEDULE_ETA=1`` in the
   publishers' environment: the rows go to the database, the broker stays
   empty). Queue purged and rows deleted afterwards.
2. Forwarding rate: ``--forward`` (default 20,000) due SCHEDULED rows (one
   ``INSERT ... SELECT``) forwarded by ``scheduler.forward_due(app)`` (batch
   500, one broker connection, windowed publisher confirms) vs plain
   ``apply_async`` of as many tasks from one process, with Celery's publisher
   confirms (``confirm_publish``, the anchor that promises as much) and without,
   all to a queue nobody consumes (purged after each run).
   Median of ``--rounds``.
3. Lateness: a worker (``-c 2``) and ``manage.py run_scheduler`` (default
   interval) run; ``--lateness-tasks`` (default 2,000) ``add`` tasks are
   scheduled with countdowns drawn uniformly from 5-20 s. Per task: when the
   sender published it (an ``after_task_publish`` receiver in the sender
   process) and ``date_started`` (worker) minus ``eta``; p50/p95/p99/max.
   Exactly once: every row SUCCESS, one publish per task id in the sender, one
   execution per task id in the worker log.
4. Empty pass: ``--future-rows`` (default 1,000,000) SCHEDULED rows due in
   30-395 days (``INSERT ... SELECT generate_series``, reused across runs),
   VACUUM ANALYZE, then ``Sender.forward_due()`` of a long-lived sender (as
   ``run_scheduler`` keeps one) with nothing due: wall time per pass (median of
   ``--passes``), and ``EXPLAIN (ANALYZE, BUFFERS)`` of every statement the pass
   runs (captured on the sender's database thread), plus the next-eta query
   ``run_scheduler`` polls between passes.

The not-yet-due rows of (4) stay in the table during (1)-(3), as a backlog
would in production: the scheduler's queries must skip them. Workers are named
``fulldb-bench-sched-<pid>@127.0.0.1``, run in their own session and are
stopped in ``finally`` blocks (SIGTERM, then SIGKILL of the group after a
time limit); a worker or sender left by a killed run is stopped at the next
start (pid files in the var dir).

    python bench/scheduler.py [--quick] [--tasks 100000] [--forward 20000] [--rounds 3]
        [--lateness-tasks 2000] [--spread 5 20] [--future-rows 1000000] [--refill]
        [--parts memory,forward,lateness,empty] [--json-out FILE]

``--quick`` (about a minute): 10,000 tasks for the memory, 5,000 rows and one round
for the forwarding, 500 tasks over 3-8 s for the lateness, and 100,000 not-yet-due
rows (or the 1,000,000 of an earlier full run, reused).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.reexec_in_venv()

DB_NAME = _common.SCHED_DB_NAME
QUEUE = _common.SCHED_QUEUE
VAR_DIR = Path(_common.SCHED_VAR_DIR)
NODE_PREFIX = "fulldb-bench-sched"
SENDER_MARKER = "--role sender"
TASK = "testproject.demo.tasks.add"
#: task_id prefix of the not-yet-due rows of the empty-pass measurement (kept across runs).
FUTURE_PREFIX = "bench-future-"
#: With -c 1: prefetch_count 65535, AMQP's largest (Celery sends the initial value as is,
#: so 100000 fails with struct.error). Each ETA task received adds one; past 65535 kombu
#: lifts the limit altogether, so the worker takes every message.
PREFETCH_MULTIPLIER = 65_535
COUNTDOWN = 3600
WORKER_START_TIMEOUT = 90.0
#: With 100,000 ETA requests held, a warm shutdown takes a few seconds more.
WORKER_STOP_TIMEOUT = 30.0
POLL = 0.5
PARTS = ("memory", "forward", "lateness", "empty")
TARGET_LATENESS_P99_MS = 1000.0
TARGET_EMPTY_PASS_MS = 1.0

QUICK = {
    "tasks": 10_000,
    "forward": 5_000,
    "rounds": 1,
    "lateness_tasks": 500,
    "spread": (3.0, 8.0),
    "future_rows": 100_000,
}


def child_env(**extra: str) -> dict[str, str]:
    return _common.bench_env(DB_NAME, QUEUE, str(VAR_DIR), PYTHONUNBUFFERED="1", **extra)


def setup(migrate: bool = True, **extra: str) -> None:
    _common.setup(DB_NAME, migrate, queue=QUEUE, var_dir=str(VAR_DIR), **extra)


def scheduler_env() -> dict[str, str]:
    """FULLDB_SCHEDULE_ETA as the parent gave it (bench_env drops it otherwise)."""
    return {"FULLDB_SCHEDULE_ETA": "1"} if os.environ.get("FULLDB_SCHEDULE_ETA") == "1" else {}


# -- /proc ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the prefork pool children)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            children[int(_stat_fields(int(entry.name))[1])].append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


# -- child processes ------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Child:
    """A worker or the sender: its own session, a pid file, stopped in order."""

    def __init__(
        self, kind: str, command: list[str], env: dict[str, str], log: Path, marker: str
    ) -> None:
        self.kind, self.command, self.env, self.log_path = kind, command, env, log
        self.marker = marker
        self.proc: subprocess.Popen | None = None

    @property
    def pidfile(self) -> Path:
        return VAR_DIR / f"{self.kind}.pid"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=_common.REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            )
        self.pidfile.write_text(str(self.proc.pid))

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} exited with {self.proc.returncode}; log:\n{self.log_tail()}"
            )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> int | None:
        """SIGTERM (warm shutdown), wait; SIGKILL the process group if it hangs."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        print(f"  stopping {self.kind} {proc.pid}", file=sys.stderr)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=WORKER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print(f"{self.kind} did not stop in time: SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stray pool children, if any
            return proc.wait(timeout=WORKER_STOP_TIMEOUT)
        finally:
            self.pidfile.unlink(missing_ok=True)
            signal.signal(signal.SIGINT, previous)


def reap_leftovers() -> None:
    """Stop a worker or sender that an earlier, killed run left behind (pid files)."""
    for kind, marker in (("worker", NODE_PREFIX), ("sender", SENDER_MARKER)):
        pidfile = VAR_DIR / f"{kind}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if marker in _cmdline(pid) and _alive(pid):
            print(f"stopping the {kind} {pid} left by an earlier run", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + WORKER_STOP_TIMEOUT
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)


def node_name() -> str:
    return f"{NODE_PREFIX}-{os.getpid()}@127.0.0.1"


def worker_command(concurrency: int, *extra: str, loglevel: str = "WARNING") -> list[str]:
    return _common.worker_command(QUEUE, node_name(), concurrency, *extra, loglevel=loglevel)


def new_worker(
    label: str, concurrency: int, env: dict[str, str], *extra: str, loglevel: str = "WARNING"
) -> Child:
    return Child(
        "worker",
        worker_command(concurrency, *extra, loglevel=loglevel),
        env,
        VAR_DIR / f"{label}-worker.log",
        NODE_PREFIX,
    )


def wait_idle(pids_of, quiet: float = 0.05, needed: int = 3, timeout: float = 120.0) -> float:
    """Wait until the processes used less than ``quiet`` CPU seconds in each of ``needed``
    consecutive seconds; return how long it took."""
    started = time.monotonic()
    calm = 0
    last = cpu_seconds(pids_of())
    while calm < needed and time.monotonic() - started < timeout:
        time.sleep(1.0)
        now = cpu_seconds(pids_of())
        calm = calm + 1 if now - last < quiet else 0
        last = now
    return time.monotonic() - started


# -- broker -----------------------------------------------------------------------------


def purge(app) -> int:
    """Declare the benchmark queue (if missing) and drop its ready messages."""
    queue = app.amqp.queues[QUEUE]
    with app.connection_for_write() as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        return bound.purge() or 0


def queue_state(app) -> tuple[int, int]:
    """(ready messages, consumers) of the benchmark queue (passive declare)."""
    with app.connection_for_write() as conn:
        ok = conn.default_channel.queue_declare(queue=QUEUE, passive=True)
        return ok.message_count, ok.consumer_count


def rabbit_counts() -> tuple[int, int] | None:
    """(messages_ready, messages_unacknowledged) from rabbitmqctl, or None without it."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name", "messages_ready",
             "messages_unacknowledged"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == QUEUE and fields[1].isdigit():
            return int(fields[1]), int(fields[2])
    return None


def purge_until_empty(app, timeout: float = 20.0) -> int:
    """Purge until nothing is ready (a stopped worker hands its unacked messages back)."""
    purged = 0
    deadline = time.monotonic() + timeout
    while True:
        purged += purge(app)
        counts = rabbit_counts()
        ready, _ = queue_state(app)
        if ready == 0 and (counts is None or counts == (0, 0)):
            return purged
        if time.monotonic() > deadline:
            print(f"  queue {QUEUE} not empty after purging: {counts}", file=sys.stderr)
            return purged
        time.sleep(POLL)


def wait_consuming(app, worker: Child, timeout: float = WORKER_START_TIMEOUT) -> float:
    started = time.monotonic()
    while queue_state(app)[1] < 1:
        worker.check()
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"worker not consuming after {timeout:.0f} s:\n{worker.log_tail()}")
        time.sleep(POLL)
    return time.monotonic() - started


# -- database ---------------------------------------------------------------------------


def sql(query: str, params: list | None = None, fetch: bool = True) -> list[tuple]:
    """Run a statement on ``default``; once more on a new connection if it was dropped
    (the test suite restarts PostgreSQL, and other jobs share this server)."""
    from django.db import InterfaceError, OperationalError, connection

    for attempt in (1, 2):
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, params)
                return cursor.fetchall() if fetch and cursor.description else []
        except (OperationalError, InterfaceError):
            if attempt == 2 or connection.in_atomic_block:
                raise
            time.sleep(2)
            connection.close()
    return []


def delete_bench_rows() -> int:
    """Every row but the kept not-yet-due ones (and our workers' heartbeats)."""
    sql(f"DELETE FROM {_common.TASK_TABLE} WHERE task_id NOT LIKE %s", [FUTURE_PREFIX + "%"])
    sql(
        "DELETE FROM django_celery_fulldbresult_workerheartbeat WHERE hostname LIKE %s",
        [NODE_PREFIX + "-%"],
    )
    return 0


def count_rows(where: str, params: list | None = None) -> int:
    return sql(f"SELECT COUNT(*) FROM {_common.TASK_TABLE} WHERE {where}", params)[0][0]


@contextlib.contextmanager
def scheduler_on():
    """In this process: what FULLDB_SCHEDULE_ETA=1 turns on (settings + interception)."""
    from django.test import override_settings

    from django_celery_fulldbresult import scheduler
    from testproject.celery_app import app

    with override_settings(
        DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA=True,
        DJANGO_CELERY_FULLDBRESULT_MONKEY_PATCH_ASYNC=True,
    ):
        installed = scheduler.is_installed(app)
        scheduler.install(app)
        try:
            yield
        finally:
            if not installed:
                scheduler.uninstall(app)


TEMPLATE_COLUMNS = ("task", "kwargs", "kwargsrepr", "replayable", "options", "queue",
                    "exchange", "routing_key", "priority")  # fmt: skip


def template_row() -> dict[str, Any]:
    """The columns a real ``add.apply_async((0, 0), countdown=3600)`` stores, so that the
    bulk-filled rows are the rows the scheduler really writes."""
    from testproject.demo.tasks import add

    with scheduler_on():
        result = add.apply_async((0, 0), countdown=COUNTDOWN)
    columns = ", ".join(f"{c}::text" if c in ("kwargs", "options") else c for c in TEMPLATE_COLUMNS)
    row = sql(f"SELECT status, {columns} FROM {_common.TASK_TABLE} WHERE task_id = %s", [result.id])
    sql(f"DELETE FROM {_common.TASK_TABLE} WHERE task_id = %s", [result.id])
    if not row or row[0][0] != "SCHEDULED":
        raise RuntimeError(f"apply_async(countdown=...) did not store a SCHEDULED row: {row}")
    return dict(zip(TEMPLATE_COLUMNS, row[0][1:], strict=True))


def fill_scheduled(template: dict[str, Any], count: int, task_id: str, eta: str) -> None:
    """``count`` SCHEDULED ``add(g, g)`` rows in one INSERT ... SELECT; ``task_id`` and
    ``eta`` are SQL expressions of ``s.g`` (1..count)."""
    sql(
        f"""
        INSERT INTO {_common.TASK_TABLE} (
            task_id, task, status, args, argsrepr, kwargs, kwargsrepr, replayable, options,
            queue, exchange, routing_key, priority, root_id, retries, eta, date_submitted,
            date_modified
        )
        SELECT s.id, %s, 'SCHEDULED', jsonb_build_array(s.g, s.g), format('(%%s, %%s)', s.g, s.g),
               %s::jsonb, %s, %s, %s::jsonb, %s, %s, %s, %s, s.id, 0, {eta}, now(), now()
        FROM (SELECT {task_id} AS id, g FROM generate_series(1, %s) AS g) AS s
        """,
        [*(template[c] for c in TEMPLATE_COLUMNS), count],
        fetch=False,
    )


# -- roles: the publisher and the sender processes -------------------------------------------


def publisher_role(args: argparse.Namespace) -> None:
    """Publish ``--count`` ``add`` tasks with a countdown; print one JSON line."""
    setup(False, **scheduler_env())
    from django.conf import settings

    from django_celery_fulldbresult import scheduler
    from testproject.celery_app import app
    from testproject.demo.tasks import add

    # The publisher writes no PENDING rows: only the scheduler's SCHEDULED rows count.
    _common.set_setting("TRACK_PUBLISH", False)
    rng = random.Random(args.seed * 1_000_003 + args.first)
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(args.first, args.first + args.count):
            countdown = args.countdown if args.spread is None else rng.uniform(*args.spread)
            add.apply_async((i, i), countdown=countdown, producer=producer)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "count": args.count,
                "seconds": seconds,
                "patched": scheduler.is_installed(app),
                "schedule_eta": bool(settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA),
            }
        )
    )


def sender_role(args: argparse.Namespace) -> None:
    """``manage.py run_scheduler`` exactly as testproject/manage.py runs it, plus an
    ``after_task_publish`` receiver that notes when each task was published."""
    setup(False, **scheduler_env())
    from celery.signals import after_task_publish
    from django.core.management import execute_from_command_line

    published: list[tuple[str, float]] = []

    def on_publish(sender=None, headers=None, **_: Any) -> None:
        published.append(((headers or {}).get("id"), time.time()))

    after_task_publish.connect(on_publish, weak=False)
    try:
        execute_from_command_line(["manage.py", "run_scheduler"])
    finally:
        Path(args.publish_log).write_text(json.dumps(published))


def publish(
    count: int,
    processes: int,
    schedule: bool,
    countdown: float | None = None,
    spread: tuple[float, float] | None = None,
    seed: int = 1,
) -> dict:
    """Run ``processes`` publisher processes (``count`` tasks in all); wait for them."""
    env = child_env(**({"FULLDB_SCHEDULE_ETA": "1"} if schedule else {}))
    share = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    procs = []
    started = time.monotonic()
    try:
        first = 0
        for n in share:
            command = [sys.executable, __file__, "--role", "publish", "--count", str(n),
                       "--first", str(first), "--seed", str(seed)]  # fmt: skip
            if spread is None:
                command += ["--countdown", str(countdown)]
            else:
                command += ["--spread", str(spread[0]), str(spread[1])]
            procs.append(
                subprocess.Popen(
                    command, cwd=_common.REPO, env=env, stdout=subprocess.PIPE, text=True
                )
            )
            first += n
        outputs = []
        for proc in procs:
            out, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"publisher exited with {proc.returncode}")
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - started
    if any(o["patched"] != schedule for o in outputs):
        raise RuntimeError(f"publishers: scheduler expected {schedule}, got {outputs}")
    busiest = max(o["seconds"] for o in outputs)
    return {
        "count": sum(o["count"] for o in outputs),
        "processes": processes,
        "seconds": seconds,
        # Inside the publishers (no process start-up): the slowest one's publishing time.
        "busiest_seconds": busiest,
        "calls_per_s": count / busiest,
        "publishers": outputs,
    }


# -- 1. worker memory ---------------------------------------------------------------------


def memory_mode(app, mode: str, tasks: int, publishers: int, timeout: float) -> dict:
    schedule = mode == "scheduler"
    extra = {"FULLDB_SCHEDULE_ETA": "1"} if schedule else {}
    purge_until_empty(app)
    delete_bench_rows()
    worker = new_worker(
        f"memory-{mode}",
        1,
        child_env(**extra),
        "--prefetch-multiplier",
        str(PREFETCH_MULTIPLIER),
    )
    try:
        worker.start()
        wait_consuming(app, worker)

        def tree() -> list[int]:
            return process_tree(worker.pid)

        wait_idle(tree)
        pids = tree()
        before, main_before = rss_bytes(pids), rss_bytes([worker.pid])
        print(f"  {mode}: idle worker RSS {before / 2**20:.1f} MiB, publishing", file=sys.stderr)
        published = publish(tasks, publishers, schedule, countdown=COUNTDOWN)
        counts = rabbit_counts()
        ingest_started = time.monotonic()
        if not schedule:
            # The worker holds them all once RabbitMQ has none ready and all unacked.
            while True:
                worker.check()
                counts = rabbit_counts()
                ready, _ = queue_state(app)
                if ready == 0 and (counts is None or counts[1] >= tasks):
                    break
                if time.monotonic() - ingest_started > timeout:
                    raise TimeoutError(f"native: worker holds {counts} of {tasks} after {timeout}s")
                time.sleep(POLL)
        wait_idle(tree)
        ingest_seconds = time.monotonic() - ingest_started
        pids = tree()
        after, main_after = rss_bytes(pids), rss_bytes([worker.pid])
        counts = rabbit_counts()
        ready, consumers = queue_state(app)
        scheduled_rows = count_rows(
            "status = 'SCHEDULED' AND task_id NOT LIKE %s", [FUTURE_PREFIX + "%"]
        )
        worker.check()
    finally:
        code = worker.stop()
        purged = purge_until_empty(app)
        delete_bench_rows()
    print(
        f"  {mode}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
        f"({(after - before) / tasks:,.0f} B/task)",
        file=sys.stderr,
    )
    return {
        "mode": mode,
        "tasks": tasks,
        "rss_before": before,
        "rss_after": after,
        "main_rss_before": main_before,
        "main_rss_after": main_after,
        "processes": len(pids),
        "bytes_per_task": (after - before) / tasks,
        "publish": published,
        "settle_seconds": ingest_seconds,
        "broker_ready_after": ready,
        "broker_unacked_after": counts[1] if counts else None,
        "scheduled_rows_after": scheduled_rows,
        "purged": purged,
        "worker_exit_code": code,
        "worker_log": str(worker.log_path),
    }


def measure_memory(app, tasks: int, publishers: int) -> dict:
    return {
        mode: memory_mode(app, mode, tasks, publishers, timeout=300.0)
        for mode in ("native", "scheduler")
    }


def memory_section(result: dict, publishers: int) -> dict:
    mib = 2**20
    native, sched = result["native"], result["scheduler"]
    rows = []
    for label, r in (("native Celery ETA", native), ("DB scheduler", sched)):
        held = (
            f"{r['broker_unacked_after']:,} unacked in RabbitMQ"
            if r["mode"] == "native"
            else f"{r['scheduled_rows_after']:,} SCHEDULED rows, broker "
            f"{r['broker_ready_after']} ready / {r['broker_unacked_after']} unacked"
        )
        rows.append(
            [
                label,
                f"{r['rss_before'] / mib:.1f}",
                f"{r['rss_after'] / mib:.1f}",
                f"{(r['rss_after'] - r['rss_before']) / mib:+.1f}",
                f"{r['bytes_per_task']:,.0f}",
                f"{r['main_rss_before'] / mib:.1f} -> {r['main_rss_after'] / mib:.1f}",
                held,
                f"{r['publish']['busiest_seconds']:.1f} ({r['publish']['calls_per_s']:,.0f}/s)",
            ]
        )
    growth_n = native["rss_after"] - native["rss_before"]
    growth_s = sched["rss_after"] - sched["rss_before"]
    ratio_after = native["rss_after"] / sched["rss_after"]
    growth_text = (
        f"{growth_n / growth_s:,.0f}x"
        if growth_s > 2**20
        else f"n/a (scheduler growth {growth_s / 1024:+,.0f} KiB: within noise)"
    )
    tasks = native["tasks"]
    return {
        "title": f"1. Worker memory: {tasks:,} `add` tasks with countdown={COUNTDOWN}",
        "headers": [
            "mode",
            "RSS idle MiB",
            "RSS after MiB",
            "growth MiB",
            "bytes/task",
            "main process MiB",
            "tasks held by",
            f"publish s, calls/s ({publishers} processes)",
        ],
        "rows": rows,
        "notes": [
            f"RSS after: native / scheduler = **{ratio_after:.1f}x**; growth: native / "
            f"scheduler = {growth_text}",
            "RSS = VmRSS of the worker's main process + its pool child (/proc), measured once "
            "the worker used < 0.05 CPU s in each of 3 consecutive seconds (after RabbitMQ "
            "reported every message unacknowledged, for native ETA)",
            "worker: `"
            + " ".join(
                worker_command(1, "--prefetch-multiplier", str(PREFETCH_MULTIPLIER))[1:]
            ).replace(node_name(), f"{NODE_PREFIX}-PID@127.0.0.1")
            + "`: prefetch_count 65535 (the AMQP maximum: `--prefetch-multiplier 100000` "
            "stops the worker with `struct.error` in basic_qos); every ETA task received "
            "raises it by one, and past 65535 kombu lifts the limit",
            "DB scheduler: `FULLDB_SCHEDULE_ETA=1` in the publishers' (and the worker's) "
            "environment; each call is one INSERT in autocommit; publish tracking off in both",
            "afterwards the worker was stopped, the queue purged "
            f"({native['purged']:,} messages for native ETA) and the rows deleted",
        ],
    }


# -- 2. forwarding rate -------------------------------------------------------------------------


def timed_publish(app, run, expected: int, timeout: float = 60.0) -> dict:
    """Time ``run()`` until RabbitMQ holds ``expected`` ready messages (publishes are not
    confirmed: when the loop returns, some are still on their way). Polls every 5 ms on
    a connection opened beforehand."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.queue_declare(queue=QUEUE, passive=True)
        t0 = time.perf_counter()
        value = run()
        loop = time.perf_counter() - t0
        while True:
            ready = channel.queue_declare(queue=QUEUE, passive=True).message_count
            seconds = time.perf_counter() - t0
            if ready >= expected or seconds > loop + timeout:
                break
            time.sleep(0.005)
    return {
        "value": value,
        "seconds": seconds,
        "per_s": expected / seconds,
        "loop_seconds": loop,
        "loop_per_s": expected / loop,
        "in_queue": ready,
    }


def measure_forwarding(app, count: int, rounds: int, batch: int) -> dict:

    from django_celery_fulldbresult import scheduler
    from testproject.demo.tasks import add

    template = template_row()
    due_eta = "now() - interval '1 hour' + s.g * interval '1 millisecond'"
    from django.test import override_settings

    forward_runs, unconfirmed_runs, plain_runs, confirmed_runs = [], [], [], []
    purge_until_empty(app)
    delete_bench_rows()
    if queue_state(app)[1]:
        raise RuntimeError(f"queue {QUEUE} has a consumer: nothing may consume it here")
    try:
        for n in range(rounds):
            fill_scheduled(template, count, "gen_random_uuid()::text", due_eta)
            sql(f"ANALYZE {_common.TASK_TABLE}", fetch=False)
            with scheduler_on():
                run = timed_publish(
                    app, lambda: scheduler.forward_due(app, batch_size=batch), count
                )
            outcome = run.pop("value")
            run.update(
                sent=outcome.sent,
                claimed=outcome.claimed,
                released=outcome.released,
                failed=outcome.failed,
                rows_sent=count_rows("status = 'SCHEDULED_SENT'"),
            )
            forward_runs.append(run)
            purge_until_empty(app)
            delete_bench_rows()
            # The same without publisher confirms (what plain apply_async does).
            fill_scheduled(template, count, "gen_random_uuid()::text", due_eta)
            sql(f"ANALYZE {_common.TASK_TABLE}", fetch=False)
            with (
                scheduler_on(),
                override_settings(DJANGO_CELERY_FULLDBRESULT_SCHEDULER_CONFIRM_PUBLISH=False),
            ):
                run = timed_publish(
                    app, lambda: scheduler.forward_due(app, batch_size=batch), count
                )
            run.pop("value")
            unconfirmed_runs.append(run)
            purge_until_empty(app)
            delete_bench_rows()

            def plain() -> None:
                with app.producer_or_acquire() as producer:
                    for i in range(count):
                        add.apply_async((i, i), producer=producer)

            run = timed_publish(app, plain, count)
            run.pop("value")
            plain_runs.append(run)
            purge_until_empty(app)

            # Plain apply_async with publisher confirms on, as Celery offers them
            # (broker_transport_options={"confirm_publish": True}: each publish waits for
            # its confirm): the anchor that promises what forwarding promises.
            def plain_confirmed() -> None:
                with app.connection_for_write(transport_options={"confirm_publish": True}) as conn:
                    producer = app.amqp.Producer(conn)
                    for i in range(count):
                        add.apply_async((i, i), producer=producer)

            run = timed_publish(app, plain_confirmed, count)
            run.pop("value")
            confirmed_runs.append(run)
            purge_until_empty(app)
            print(
                f"  round {n + 1}: forward_due {forward_runs[-1]['per_s']:,.0f}/s, "
                f"apply_async {plain_runs[-1]['per_s']:,.0f}/s, "
                f"confirmed {confirmed_runs[-1]['per_s']:,.0f}/s",
                file=sys.stderr,
            )
        # What forwarding costs on the database: two batches, every statement captured
        # (with Django's timing), then each kind explained.
        fill_scheduled(template, 2 * batch, "gen_random_uuid()::text", due_eta)
        with scheduler_on(), scheduler.Sender(app) as sender:
            t0 = time.perf_counter()
            outcome, captured = on_database_thread(
                sender, lambda: sender.forward_due(batch_size=batch)
            )
            captured_seconds = time.perf_counter() - t0
        costs = statement_costs(captured)
        kinds = collections.Counter(q["sql"].split(None, 1)[0].upper() for q in captured)
        table_rows = count_rows("TRUE")
    finally:
        purge_until_empty(app)
        delete_bench_rows()
    return {
        "count": count,
        "batch": batch,
        "forward_per_s": _common.median(r["per_s"] for r in forward_runs),
        "plain_per_s": _common.median(r["per_s"] for r in plain_runs),
        "forward_loop_per_s": _common.median(r["loop_per_s"] for r in forward_runs),
        "plain_loop_per_s": _common.median(r["loop_per_s"] for r in plain_runs),
        "forward_runs": forward_runs,
        "unconfirmed_per_s": _common.median(r["per_s"] for r in unconfirmed_runs),
        "unconfirmed_loop_per_s": _common.median(r["loop_per_s"] for r in unconfirmed_runs),
        "unconfirmed_runs": unconfirmed_runs,
        "plain_runs": plain_runs,
        "confirmed_per_s": _common.median(r["per_s"] for r in confirmed_runs),
        "confirmed_loop_per_s": _common.median(r["loop_per_s"] for r in confirmed_runs),
        "confirmed_runs": confirmed_runs,
        "statements_two_batches": len(captured),
        "statement_kinds": dict(kinds),
        "statement_costs": costs,
        "captured_seconds": captured_seconds,
        "captured_sent": outcome.sent,
        "table_rows": table_rows,
        "all_sent": all(r["sent"] == count and r["in_queue"] == count for r in forward_runs),
        "plain_all_queued": all(r["in_queue"] == count for r in plain_runs + confirmed_runs),
    }


def forwarding_section(result: dict, rounds: int) -> dict:
    ratio = result["forward_per_s"] / result["plain_per_s"]
    confirmed_ratio = result["forward_per_s"] / result["confirmed_per_s"]
    f_runs = ", ".join(f"{r['per_s']:,.0f}" for r in result["forward_runs"])
    p_runs = ", ".join(f"{r['per_s']:,.0f}" for r in result["plain_runs"])
    count = result["count"]
    return {
        "title": f"2. Forwarding rate: {count:,} due rows, one process, one broker connection "
        f"(median of {rounds})",
        "headers": [
            "path",
            "tasks/s",
            "tasks/s per round",
            "tasks/s, loop only",
            "in the queue after",
            "vs plain",
            "vs plain, confirmed",
        ],
        "rows": [
            [
                f"`scheduler.forward_due(app)`, batch {result['batch']}",
                result["forward_per_s"],
                f_runs,
                result["forward_loop_per_s"],
                ", ".join(f"{r['in_queue']:,}" for r in result["forward_runs"]),
                f"**{ratio:.2f}x**",
                f"**{confirmed_ratio:.2f}x**",
            ],
            [
                "the same, `SCHEDULER_CONFIRM_PUBLISH = False`",
                result["unconfirmed_per_s"],
                ", ".join(f"{r['per_s']:,.0f}" for r in result["unconfirmed_runs"]),
                result["unconfirmed_loop_per_s"],
                ", ".join(f"{r['in_queue']:,}" for r in result["unconfirmed_runs"]),
                f"{result['unconfirmed_per_s'] / result['plain_per_s']:.2f}x",
                "",
            ],
            [
                "plain `add.apply_async((i, i), producer=producer)`",
                result["plain_per_s"],
                p_runs,
                result["plain_loop_per_s"],
                ", ".join(f"{r['in_queue']:,}" for r in result["plain_runs"]),
                "",
                "",
            ],
            [
                "the same, `broker_transport_options={'confirm_publish': True}`",
                result["confirmed_per_s"],
                ", ".join(f"{r['per_s']:,.0f}" for r in result["confirmed_runs"]),
                result["confirmed_loop_per_s"],
                ", ".join(f"{r['in_queue']:,}" for r in result["confirmed_runs"]),
                "",
                "",
            ],
        ],
        "notes": [
            f"goal forwarding >= 2x plain apply_async with confirms on: "
            f"**{'met' if confirmed_ratio >= 2 else 'NOT met'}** ({confirmed_ratio:.2f}x); "
            f"against plain apply_async without confirms (which promises nothing once the "
            f"loop returns): {ratio:.2f}x",
            "rows: one `INSERT ... SELECT generate_series` of due SCHEDULED rows shaped like "
            "the row a real `add.apply_async((0, 0), countdown=3600)` stores; every forwarded "
            f"row ended SCHEDULED_SENT: {'yes' if result['all_sent'] else 'NO'}",
            "tasks/s: from the first call until RabbitMQ holds all of them (passive "
            "queue_declare every 5 ms; apply_async's publishes are unconfirmed, so its loop "
            "ends before the last ones arrive); loop only: until `forward_due`/the loop "
            "returns; forward_due waits for RabbitMQ's publisher confirms every 100 messages "
            "by default (plain apply_async does not: the second row shows that cost); "
            "Celery's own confirms (`confirm_publish`, the last row) wait for each message",
            "both publish to `bench_sched`, which nothing consumes (checked: 0 consumers); "
            "purged after each run; publish tracking off for apply_async (forwarding never "
            "tracks)",
            f"the table held {result['table_rows']:,} rows while forwarding (the not-yet-due "
            "rows of part 4 included: the scheduler's queries must not depend on them)",
        ],
    }


def forwarding_costs_section(result: dict) -> dict:
    costs = result["statement_costs"]
    db_ms = sum(c["ms"] for c in costs)
    rows = []
    for c in sorted(costs, key=lambda c: -c["ms"]):
        rows.append(
            [
                c["label"],
                str(c["calls"]),
                f"{c['ms_per_call']:.1f}",
                f"{c['ms']:.0f}",
                ", ".join(c["indexes"]) or "none",
                "**yes**" if c["seq_scan_on_task_table"] else "no",
            ]
        )
    sent = result["captured_sent"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(result["statement_kinds"].items()))
    return {
        "title": f"2b. Forwarding: database statements for {sent:,} rows "
        f"(batch {result['batch']}), {result['table_rows']:,} rows in the table",
        "headers": ["statement", "calls", "ms per call", "ms total", "indexes", "seq scan"],
        "rows": rows,
        "notes": [
            f"{result['statements_two_batches']} statements captured ({kinds}); database time "
            f"{db_ms:.0f} ms of {result['captured_seconds'] * 1000:.0f} ms wall "
            f"({db_ms / max(sent, 1):.3f} ms per row; the rest is publishing)",
            "ms: Django's timing of each statement (CaptureQueriesContext, 1 ms resolution "
            "per statement); plans: EXPLAIN (ANALYZE, BUFFERS) of the first statement of "
            "each kind, re-run afterwards in a rolled-back transaction (see below)",
        ],
        "code": "\n\n".join(
            shorten(f"-- {c['label']}\n{c['sql']}\n" + "\n".join(c["plan"]))
            for c in result["statement_costs"]
        ),
    }


# -- 3. lateness -----------------------------------------------------------------------------

RECEIVED_RE = re.compile(r"Task testproject\.demo\.tasks\.add\[([0-9a-f-]{36})\] received")
SUCCEEDED_RE = re.compile(r"Task testproject\.demo\.tasks\.add\[([0-9a-f-]{36})\] succeeded")


def measure_lateness(app, count: int, spread: tuple[float, float], timeout: float) -> dict:
    from testproject.demo.tasks import noop

    purge_until_empty(app)
    delete_bench_rows()
    publish_log = VAR_DIR / "lateness-sender-published.json"
    publish_log.unlink(missing_ok=True)
    env = child_env(FULLDB_SCHEDULE_ETA="1")
    worker = new_worker("lateness", 2, env, loglevel="INFO")
    sender = Child(
        "sender",
        [sys.executable, __file__, "--role", "sender", "--publish-log", str(publish_log)],
        env,
        VAR_DIR / "lateness-sender.log",
        SENDER_MARKER,
    )
    try:
        worker.start()
        sender.start()
        wait_consuming(app, worker)
        # Warm-up: both pool processes import, connect and run a task.
        with app.producer_or_acquire() as producer:
            for _ in range(10):
                noop.apply_async(producer=producer)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while count_rows("task LIKE %s AND status = 'SUCCESS'", ["%.noop"]) < 10:
            worker.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"warm-up tasks not done:\n{worker.log_tail()}")
            time.sleep(POLL)
        sql(f"DELETE FROM {_common.TASK_TABLE} WHERE task LIKE %s", ["%.noop"])
        while "run_scheduler: polling" not in sender.log_text():
            sender.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"sender not polling:\n{sender.log_tail()}")
            time.sleep(POLL)
        print(f"  scheduling {count} tasks over {spread[0]:g}-{spread[1]:g} s", file=sys.stderr)
        published = publish(count, 1, True, spread=spread)
        deadline = time.monotonic() + spread[1] + timeout
        while True:
            done = count_rows("task = %s AND status = 'SUCCESS'", [TASK])
            if done >= count:
                break
            worker.check()
            sender.check()
            if time.monotonic() > deadline:
                print(f"  only {done}/{count} SUCCESS in time", file=sys.stderr)
                break
            time.sleep(POLL)
        time.sleep(1.0)  # a duplicate execution would show up in the worker log by now
    finally:
        sender_code = sender.stop()
        worker_code = worker.stop()
    try:
        rows = sql(
            f"""SELECT task_id, status,
                       EXTRACT(EPOCH FROM eta)::float8,
                       EXTRACT(EPOCH FROM date_started - eta)::float8 * 1000
                FROM {_common.TASK_TABLE} WHERE task = %s AND task_id NOT LIKE %s""",
            [TASK, FUTURE_PREFIX + "%"],
        )
        purged = purge_until_empty(app)
    finally:
        delete_bench_rows()
    sends = json.loads(publish_log.read_text()) if publish_log.exists() else []
    sent_count = collections.Counter(task_id for task_id, _ in sends)
    sent_at = dict(sends)
    log = worker.log_text()
    received = collections.Counter(RECEIVED_RE.findall(log))
    succeeded = collections.Counter(SUCCEEDED_RE.findall(log))
    statuses = collections.Counter(status for _, status, _, _ in rows)
    started_late = sorted(late for *_, late in rows if late is not None)
    published_late = sorted(
        (sent_at[task_id] - eta) * 1000 for task_id, _, eta, _ in rows if task_id in sent_at
    )
    once = sum(
        1
        for task_id, status, _, _ in rows
        if status == "SUCCESS" and sent_count[task_id] == 1 and succeeded[task_id] == 1
    )
    return {
        "count": count,
        "spread": list(spread),
        "rows": len(rows),
        "statuses": dict(statuses),
        "published": published,
        "sender_publishes": len(sends),
        "sent_more_than_once": sum(1 for v in sent_count.values() if v > 1),
        "received_in_worker": sum(received.values()),
        "executions": sum(succeeded.values()),
        "executed_more_than_once": sum(1 for v in succeeded.values() if v > 1),
        "exactly_once": once,
        "publish_lateness_ms": _stats(published_late),
        "started_lateness_ms": _stats(started_late),
        "purged_after": purged,
        "sender_exit_code": sender_code,
        "worker_exit_code": worker_code,
        "worker_log": str(worker.log_path),
        "sender_log": str(sender.log_path),
    }


def _stats(values: list[float]) -> dict:
    return {
        "n": len(values),
        "min": values[0] if values else float("nan"),
        "p50": _common.percentile(values, 50),
        "p95": _common.percentile(values, 95),
        "p99": _common.percentile(values, 99),
        "max": values[-1] if values else float("nan"),
    }


def lateness_section(result: dict) -> dict:
    rows = []
    for label, key in (
        ("sender published - eta", "publish_lateness_ms"),
        ("worker date_started - eta", "started_lateness_ms"),
    ):
        s = result[key]
        rows.append(
            [
                label,
                f"{s['n']:,}",
                f"{s['min']:.1f}",
                f"{s['p50']:.1f}",
                f"{s['p95']:.1f}",
                f"{s['p99']:.1f}",
                f"{s['max']:.1f}",
            ]
        )
    p99 = result["started_lateness_ms"]["p99"]
    lo, hi = result["spread"]
    count = result["count"]
    return {
        "title": f"3. Lateness: {count:,} `add` tasks, countdowns uniform over {lo:g}-{hi:g} s, "
        "`run_scheduler` (interval 1 s) + worker -c 2",
        "headers": ["lateness ms", "tasks", "min", "p50", "p95", "p99", "max"],
        "rows": rows,
        "notes": [
            f"goal p99 < {TARGET_LATENESS_P99_MS:.0f} ms (worker start): "
            f"**{'met' if p99 < TARGET_LATENESS_P99_MS else 'NOT met'}** ({p99:.1f} ms)",
            f"exactly once: **{result['exactly_once']:,} / {count:,}** (row SUCCESS, one "
            "publish by the sender, one `succeeded` line in the worker log); statuses "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(result["statuses"].items()))
            + f"; sender publishes {result['sender_publishes']:,} "
            f"({result['sent_more_than_once']} task ids more than once); worker received "
            f"{result['received_in_worker']:,}, executed {result['executions']:,} "
            f"({result['executed_more_than_once']} more than once)",
            "sender: `manage.py run_scheduler` (execute_from_command_line, as "
            "testproject/manage.py) in a process that also notes the time of each "
            "`after_task_publish`; publisher: one process with `FULLDB_SCHEDULE_ETA=1`, "
            f"{result['published']['busiest_seconds']:.1f} s for {count:,} calls",
            f"eta is the publisher's clock + countdown; date_started is written by the worker "
            f"(`CELERY_TASK_TRACK_STARTED`); same host, same clock. Logs: "
            f"{result['sender_log']}, {result['worker_log']}",
        ],
    }


# -- 4. empty pass at 1M not-yet-due rows ----------------------------------------------------


def ensure_future_rows(template: dict[str, Any], wanted: int, refill: bool) -> dict:
    """Keep ``wanted`` SCHEDULED rows due in 30-395 days; refill when fewer, or when some
    would be due within a day (a reused fill must never become due)."""
    existing, soonest = sql(
        f"""SELECT COUNT(*), MIN(eta) > now() + interval '1 day'
            FROM {_common.TASK_TABLE} WHERE task_id LIKE %s AND status = 'SCHEDULED'""",
        [FUTURE_PREFIX + "%"],
    )[0]
    if existing >= wanted and soonest and not refill:
        return {"filled": False, "rows": existing, "seconds": 0.0}
    started = time.perf_counter()
    sql(f"DELETE FROM {_common.TASK_TABLE} WHERE task_id LIKE %s", [FUTURE_PREFIX + "%"])
    fill_scheduled(
        template,
        wanted,
        f"'{FUTURE_PREFIX}' || g",
        "now() + interval '30 days' + random() * interval '365 days'",
    )
    return {"filled": True, "rows": wanted, "seconds": time.perf_counter() - started}


def explain(statement: str, repeat: int) -> dict:
    """EXPLAIN (ANALYZE, BUFFERS) ``repeat`` times, each in a rolled-back transaction."""
    from django.db import connection, transaction

    executions, plannings, lines = [], [], []
    for _ in range(repeat):
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement)
                lines = [row[0] for row in cursor.fetchall()]
            transaction.set_rollback(True)
        text = "\n".join(lines)
        executions.append(float(re.search(r"Execution Time: ([\d.]+) ms", text).group(1)))
        plannings.append(float(re.search(r"Planning Time: ([\d.]+) ms", text).group(1)))
    text = "\n".join(lines)
    return {
        "execution_ms": _common.median(executions),
        "planning_ms": _common.median(plannings),
        "executions_ms": executions,
        "plan": lines,
        "indexes": sorted(
            set(re.findall(r"Index (?:Only )?Scan(?: Backward)? (?:using|on) (\w+)", text))
        ),
        "seq_scan_on_task_table": bool(re.search(rf"Seq Scan on {_common.TASK_TABLE}\b", text)),
    }


def statement_label(statement: str) -> str:
    """What a captured scheduler statement is (by its SQL text)."""
    head = statement.lstrip().split(None, 1)[0].upper()
    if head == "UPDATE" and "'REVOKED'" in statement:
        return "expire: UPDATE status REVOKED"
    if head == "UPDATE" and "'SCHEDULED_SENT'" in statement:
        return "record: UPDATE status SCHEDULED_SENT (by id)"
    if head == "UPDATE" and 'SET "scheduled_id" = NULL' in statement:
        return "release: UPDATE scheduled_id NULL (by id)"
    if head == "UPDATE" and 'SET "scheduled_id" =' in statement:
        return "claim: UPDATE scheduled_id (by id)"
    if head == "SELECT" and "SKIP LOCKED" in statement:
        return "claim: SELECT id ... FOR UPDATE SKIP LOCKED"
    if head == "SELECT" and '"scheduled_id" = ' in statement:
        by = "id + scheduled_id" if '"id" IN (' in statement else "scheduled_id"
        return f"claim: re-read the claimed rows (by {by})"
    if head == "SELECT" and "LIMIT 1" in statement:
        return "next eta (seconds_until_next)"
    return head


LONG_LIST = re.compile(r"(\d+)(?:, ?\d+){8,}(, ?)(\d+)")


def shorten(text: str) -> str:
    """Long id lists (``IN (...)``, ``ANY ('{...}')``) cut to their ends."""

    def cut(match: re.Match) -> str:
        count = match.group(0).count(",") + 1
        return f"{match.group(1)}{match.group(2)}...{match.group(2)}{match.group(3)} ({count} ids)"

    return LONG_LIST.sub(cut, text)


def statement_costs(captured: list[dict], repeat: int = 1) -> list[dict]:
    """Captured statements grouped by kind: calls, time as Django measured it, and the
    plan of the first of each kind (EXPLAIN ANALYZE in a rolled-back transaction)."""
    kinds: dict[str, dict] = {}
    for query in captured:
        statement = query["sql"]
        if statement.split(None, 1)[0].upper() in ("BEGIN", "COMMIT", "ROLLBACK"):
            continue
        entry = kinds.setdefault(
            statement_label(statement), {"calls": 0, "ms": 0.0, "sql": statement}
        )
        entry["calls"] += 1
        entry["ms"] += float(query["time"]) * 1000
    out = []
    for label, entry in kinds.items():
        plan = explain(entry["sql"], repeat)
        out.append({"label": label, **entry, "ms_per_call": entry["ms"] / entry["calls"], **plan})
    return out


def on_database_thread(sender, operation):
    """``operation()``'s value and the statements the sender's database thread ran meanwhile
    (its connection is the thread's own, so they are captured there)."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    capture = sender.database.run(lambda: CaptureQueriesContext(connections[sender.using]))
    sender.database.run(capture.__enter__)
    try:
        value = operation()
    finally:
        sender.database.run(capture.__exit__, None, None, None)
    return value, capture.captured_queries


def measure_empty_pass(app, wanted: int, refill: bool, passes: int, repeat: int) -> dict:
    from django_celery_fulldbresult import scheduler

    fill = ensure_future_rows(template_row(), wanted, refill)
    sql(f"VACUUM (ANALYZE) {_common.TASK_TABLE}", fetch=False)
    rows_total = count_rows("TRUE")
    due = count_rows("status = 'SCHEDULED' AND eta <= now()")
    with scheduler.Sender(app) as sender:  # as run_scheduler keeps one
        for _ in range(5):  # warm: connections, plans, buffers
            sender.forward_due()
        outcome, captured = on_database_thread(sender, sender.forward_due)
        pass_statements = [q["sql"] for q in captured]
        _, captured_next = on_database_thread(sender, lambda: sender.seconds_until_next(1.0))
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            sender.forward_due()
            times.append((time.perf_counter() - t0) * 1000)
    if outcome.claimed or outcome.expired:
        raise RuntimeError(f"the empty pass found work: {outcome}")
    times.sort()
    statements = []
    for statement, in_pass in (
        *((s, True) for s in pass_statements),
        *((q["sql"], False) for q in captured_next),
    ):
        if statement.split(None, 1)[0].upper() not in ("SELECT", "UPDATE", "INSERT", "DELETE"):
            continue  # BEGIN, COMMIT: no plan
        statements.append(
            {
                "label": statement_label(statement),
                "sql": statement,
                "in_run_pass": in_pass,
                **explain(statement, repeat),
            }
        )
    in_pass = [s for s in statements if s["in_run_pass"]]
    total = sum(s["execution_ms"] for s in in_pass)
    return {
        "fill": fill,
        "rows": rows_total,
        "due": due,
        "passes": passes,
        "pass_ms_median": _common.median(times),
        "pass_ms_p90": _common.percentile(times, 90),
        "pass_ms_min": times[0],
        "pass_ms_max": times[-1],
        "statements": statements,
        "run_pass_statements": len(in_pass),
        "run_pass_captured": [q.split(None, 1)[0].upper() for q in pass_statements],
        "execution_ms_total": total,
        "target_met": total < TARGET_EMPTY_PASS_MS,
        "indexes": sorted({i for s in in_pass for i in s["indexes"]}),
        "seq_scan": any(s["seq_scan_on_task_table"] for s in in_pass),
    }


def empty_pass_section(result: dict, repeat: int) -> dict:
    rows = []
    for s in result["statements"]:
        rows.append(
            [
                s["label"] + ("" if s["in_run_pass"] else " (not in the pass)"),
                f"{s['execution_ms']:.3f} ({min(s['executions_ms']):.3f}-"
                f"{max(s['executions_ms']):.3f})",
                f"{s['planning_ms']:.3f}",
                ", ".join(s["indexes"]) or "none",
                "yes" if s["seq_scan_on_task_table"] else "no",
            ]
        )
    fill = result["fill"]
    fill_text = (
        f"filled {fill['rows']:,} rows in {fill['seconds']:.1f} s"
        if fill["filled"]
        else f"reused {fill['rows']:,} rows (--refill rebuilds them)"
    )
    plans = []
    for s in result["statements"]:
        plans.append(f"-- {s['label']}\n{s['sql']}\n" + "\n".join(s["plan"]))
    return {
        "title": f"4. Empty pass: `Sender.forward_due()` with {result['rows']:,} rows, none due",
        "text": (
            f"{fill_text}, SCHEDULED with eta 30-395 days ahead; VACUUM (ANALYZE) before; "
            f"due rows: {result['due']}. Wall time of a long-lived sender's `forward_due()`: "
            "median "
            f"**{result['pass_ms_median']:.3f} ms** (p90 {result['pass_ms_p90']:.3f}, "
            f"min {result['pass_ms_min']:.3f}, max {result['pass_ms_max']:.3f}; "
            f"{result['passes']} passes; captured per pass: "
            f"{', '.join(result['run_pass_captured'])})."
        ),
        "headers": [
            "statement",
            f"execution ms median of {repeat} (min-max)",
            "planning ms",
            "indexes used",
            "seq scan",
        ],
        "rows": rows,
        "notes": [
            f"DB execution per empty pass (the pass's statements): "
            f"**{result['execution_ms_total']:.3f} ms** vs goal < {TARGET_EMPTY_PASS_MS:.0f} "
            f"ms: **{'met' if result['target_met'] else 'NOT met'}**; index used: "
            f"{', '.join(result['indexes']) or 'NONE'}; seq scan on the task table: "
            f"{'YES' if result['seq_scan'] else 'no'}",
            "statements captured with CaptureQueriesContext on `connections['default']` "
            "during one pass; each EXPLAIN ANALYZE runs in a rolled-back transaction",
        ],
        "code": "EXPLAIN (ANALYZE, BUFFERS)\n\n" + "\n\n".join(plans),
    }


# -- main -----------------------------------------------------------------------------------


def run_part(name: str, fn, *args) -> dict:
    """One measurement; once more if the database connection dropped (PostgreSQL restarted
    by another job on this machine)."""
    from django.db import InterfaceError, OperationalError, connection

    print(f"scheduler: {name}", file=sys.stderr)
    started = time.monotonic()
    for attempt in (1, 2):
        try:
            result = fn(*args)
            result["seconds"] = time.monotonic() - started
            return result
        except (OperationalError, InterfaceError) as exc:
            if attempt == 2:
                raise
            print(f"  {name}: database error {exc!r}; once more", file=sys.stderr)
            connection.close()
            time.sleep(3)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (about 1 minute)")
    parser.add_argument("--tasks", type=int, help="memory: tasks (100000; quick 10000)")
    parser.add_argument("--publishers", type=int, default=2, help="memory: publisher processes")
    parser.add_argument("--forward", type=int, help="forwarding: rows (20000; quick 5000)")
    parser.add_argument("--rounds", type=int, help="forwarding: rounds (3; quick 1)")
    parser.add_argument("--batch", type=int, default=500, help="forwarding: batch size")
    parser.add_argument("--lateness-tasks", type=int, help="lateness: tasks (2000; quick 500)")
    parser.add_argument("--spread", type=float, nargs=2, help="lateness: countdowns (5 20)")
    parser.add_argument("--future-rows", type=int, help="empty pass: rows (1000000)")
    parser.add_argument("--refill", action="store_true", help="empty pass: refill the rows")
    parser.add_argument("--passes", type=int, default=50, help="empty pass: timed passes")
    parser.add_argument("--repeat", type=int, default=11, help="empty pass: EXPLAIN runs")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--json-out")
    # Internal: the publisher and sender processes this script starts.
    parser.add_argument("--role", choices=("publish", "sender"), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--countdown", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--publish-log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "publish":
        publisher_role(args)
        return None
    if args.role == "sender":
        sender_role(args)
        return None

    def pick(value, full, quick):
        return value if value is not None else (quick if args.quick else full)

    tasks = pick(args.tasks, 100_000, QUICK["tasks"])
    forward = pick(args.forward, 20_000, QUICK["forward"])
    rounds = pick(args.rounds, 3, QUICK["rounds"])
    lateness_tasks = pick(args.lateness_tasks, 2_000, QUICK["lateness_tasks"])
    spread = tuple(pick(args.spread, (5.0, 20.0), QUICK["spread"]))
    future_rows = pick(args.future_rows, 1_000_000, QUICK["future_rows"])
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")

    for name in ("FULLDB_BENCH_REEXEC", "FULLDB_BENCH_COMMAND"):
        os.environ.pop(name, None)
    setup()
    reap_leftovers()

    from testproject.celery_app import app

    # This process publishes no PENDING rows (the warm-up and the plain apply_async).
    _common.set_setting("TRACK_PUBLISH", False)
    results: dict[str, dict] = {}
    sections = []
    try:
        purge_until_empty(app)
        delete_bench_rows()
        # The not-yet-due rows first: the other parts run with them in the table.
        if "empty" in parts:
            results["empty"] = run_part(
                "empty pass", measure_empty_pass, app, future_rows, args.refill, args.passes,
                args.repeat,
            )  # fmt: skip
        if "memory" in parts:
            results["memory"] = run_part(
                "worker memory", measure_memory, app, tasks, args.publishers
            )
            sections.append(memory_section(results["memory"], args.publishers))
        if "forward" in parts:
            results["forward"] = run_part(
                "forwarding rate", measure_forwarding, app, forward, rounds, args.batch
            )
            sections.append(forwarding_section(results["forward"], rounds))
            sections.append(forwarding_costs_section(results["forward"]))
        if "lateness" in parts:
            results["lateness"] = run_part(
                "lateness", measure_lateness, app, lateness_tasks, spread, 60.0
            )
            sections.append(lateness_section(results["lateness"]))
        if "empty" in parts:
            sections.append(empty_pass_section(results["empty"], args.repeat))
    finally:
        with contextlib.suppress(Exception):
            purge_until_empty(app)
        with contextlib.suppress(Exception):
            delete_bench_rows()
    result = {
        "name": "scheduler",
        "quick": args.quick,
        "sections": sections,
        **results,
    }
    _common.finish("scheduler", result, args.json_out)
    return result


if __name__ == "__main__":
    main()
