"""Processes under test (workers, senders, publishers), the run log and shared checks.

Used by ``python -m soak`` and by tests/test_soak.py alike: the caller has
Django set up (on the soak database or on the test database) and passes a
:class:`Context` that says how child processes reach the same database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testproject.workers import worker_command

REPO = Path(__file__).resolve().parent.parent
TASK = "testproject.demo.tasks.soak_step"


@dataclass
class Sizes:
    """How big each scenario is: ``full()`` for ``make soak``, ``small()`` for pytest."""

    load_tasks: int
    load_delay_max: float
    worker_kill_tasks: int
    worker_kill_cases: tuple[tuple[str, bool], ...]
    sender_kills: int
    sender_kill_rows: int
    outage_seconds: float
    outage_rows: int
    race_publishes: int
    race_retries: int
    run_once_tasks: int = 300
    run_once_long_tasks: int = 8
    recovery_kill_tasks: int = 16
    recovery_policies: tuple[str, ...] = ("resend", "fail", "report")

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            load_tasks=50_000,
            load_delay_max=30.0,
            worker_kill_tasks=16,
            worker_kill_cases=(
                ("prefork", False),
                ("prefork", True),
                ("solo", False),
                ("solo", True),
            ),
            sender_kills=20,
            sender_kill_rows=20_000,
            outage_seconds=30.0,
            outage_rows=3_000,
            race_publishes=1_000,
            race_retries=1_000,
            recovery_kill_tasks=16,
        )

    @classmethod
    def small(cls) -> Sizes:
        return cls(
            load_tasks=1_500,
            load_delay_max=5.0,
            worker_kill_tasks=8,
            worker_kill_cases=(("prefork", False), ("solo", True)),
            sender_kills=4,
            sender_kill_rows=1_500,
            outage_seconds=5.0,
            outage_rows=300,
            race_publishes=200,
            race_retries=150,
            run_once_tasks=40,
            run_once_long_tasks=4,
            recovery_kill_tasks=8,
        )


@dataclass
class Context:
    """Where the scenarios run: the children's queue, logs folder and environment."""

    stack: str
    queue: str
    work_dir: Path
    child_env: dict[str, str]
    sizes: Sizes
    procs: list[subprocess.Popen] = field(default_factory=list)

    def folder(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.child_env, "FULLDB_QUEUE": self.queue, **extra}


@dataclass
class Outcome:
    """One scenario's verdict: figures for the summary line and what went wrong."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def line(self) -> str:
        figures = " ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items())
        verdict = "PASS" if self.ok else "FAIL"
        text = f"{self.name:<15} {verdict}  {figures} ({self.seconds:.0f} s)"
        if self.problems:
            text += " | " + "; ".join(self.problems[:4])
            if len(self.problems) > 4:
                text += f"; ... {len(self.problems) - 4} more"
        return text


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


# -- waiting -------------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.5) -> bool:
    """Poll until ``predicate()`` is truthy; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# -- processes -----------------------------------------------------------------------


def _spawn(ctx: Context, cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log_path = log_path  # type: ignore[attr-defined]
    ctx.procs.append(proc)
    return proc


def log_text(proc: subprocess.Popen) -> str:
    try:
        return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
    except FileNotFoundError:
        return ""


def start_worker(
    ctx: Context,
    name: str,
    folder: Path,
    pool: str = "prefork",
    concurrency: int = 2,
    **env: str,
) -> subprocess.Popen:
    cmd = worker_command(f"{name}@%h", ctx.queue, pool, concurrency)
    full_env = ctx.env(FULLDB_RUN_LOG=str(folder / "runs"), **env)
    (folder / "runs").mkdir(exist_ok=True)
    proc = _spawn(ctx, cmd, folder / f"{name}.log", full_env)
    if not wait_until(lambda: " ready." in log_text(proc) or proc.poll() is not None, 90, 0.2):
        raise RuntimeError(f"worker {name} did not start:\n{log_text(proc)[-2000:]}")
    if proc.poll() is not None:
        raise RuntimeError(f"worker {name} exited:\n{log_text(proc)[-2000:]}")
    return proc


def start_sender(ctx: Context, name: str, folder: Path, *args: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "testproject/manage.py", "run_scheduler", "--interval=0.2", *args]
    return _spawn(ctx, cmd, folder / f"{name}.log", ctx.env(**env))


def start_publisher(
    ctx: Context, name: str, folder: Path, *args: str, **env: str
) -> tuple[subprocess.Popen, Path]:
    out = folder / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "soak.publisher", "--out", str(out), "--prefix", name, *args]
    return _spawn(ctx, cmd, folder / f"{name}.log", ctx.env(**env)), out


def sender_started(proc: subprocess.Popen) -> bool:
    return "polling every" in log_text(proc)


def reclaimed_in(folder: Path) -> int:
    """Claims the senders logged in ``folder`` took back from killed ones (run_scheduler's
    "reclaimed N" lines)."""
    return sum(
        int(count)
        for log in folder.glob("*.log")
        for count in re.findall(r"reclaimed (\d+)", log.read_text(errors="replace"))
    )


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group (a prefork worker's pool children too) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def group_gone(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until the pool children of a stopped worker are gone (they hold sessions)."""

    def gone() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        return False

    if not wait_until(gone, timeout, 0.1):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def stop(ctx: Context, procs: Iterable[subprocess.Popen] | None = None) -> None:
    """SIGTERM (then SIGKILL) the given processes, or every process the context started."""
    procs = list(ctx.procs if procs is None else procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        kill(proc, signal.SIGTERM)
        group_gone(proc)
        if proc in ctx.procs:
            ctx.procs.remove(proc)


@contextlib.contextmanager
def stopping_all(ctx: Context) -> Iterator[None]:
    try:
        yield
    finally:
        stop(ctx)


def purge(app: Any, queue: str) -> None:
    """Empty the scenario's queue (a killed worker may leave messages behind)."""
    from kombu import Queue

    with app.connection_for_write() as conn:
        bound = Queue(queue).bind(conn.default_channel)
        bound.declare()
        bound.purge()


# -- the run log ---------------------------------------------------------------------


@dataclass
class RunEntry:
    attempt: int
    at: float
    pid: int


def read_runs(folder: Path) -> dict[str, list[RunEntry]]:
    """task id -> its executions (from every worker's run log in ``folder/runs``)."""
    runs: dict[str, list[RunEntry]] = defaultdict(list)
    for path in (folder / "runs").glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                runs[parts[0]].append(RunEntry(int(parts[1]), float(parts[2]), int(parts[3])))
    for entries in runs.values():
        entries.sort(key=lambda e: e.at)
    return runs


def read_published(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the task table ------------------------------------------------------------------


def chunks(items: list[str], size: int = 2000) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def states_of(ids: list[str]) -> dict[str, tuple[str, int]]:
    """task id -> (status, retries), read in chunks."""
    from django_celery_fulldbresult.models import TaskResultMeta

    found: dict[str, tuple[str, int]] = {}
    for part in chunks(ids):
        rows = TaskResultMeta.objects.filter(task_id__in=part)
        for task_id, status, retries in rows.values_list("task_id", "status", "retries"):
            found[task_id] = (status, retries)
    return found


def why(ids: list[str], limit: int = 3) -> list[str]:
    """What the rows of ``ids`` say about themselves: state, worker, runs and the end of the
    traceback (a scenario's failure message, so that a failed CI run can be diagnosed)."""
    from django_celery_fulldbresult.models import TaskResultMeta

    rows = TaskResultMeta.objects.filter(task_id__in=ids[:limit])
    return [
        f"{task_id} {status} on {hostname}: {(traceback or '').strip()[-400:]}"
        for task_id, status, hostname, traceback in rows.values_list(
            "task_id", "status", "hostname", "traceback"
        )
    ]


def count_in(ids: list[str], **filters: Any) -> int:
    from django_celery_fulldbresult.models import TaskResultMeta

    return sum(
        TaskResultMeta.objects.filter(task_id__in=part, **filters).count() for part in chunks(ids)
    )


def scheduled_rows(ids: list[str], queue: str, etas: list[float]) -> None:
    """SCHEDULED rows of ``soak_step`` due at ``etas`` (epoch seconds), as a publisher
    with SCHEDULE_ETA would write them (bulk: the scenarios that use them test senders)."""
    from datetime import datetime, timezone

    from django.conf import settings

    from django_celery_fulldbresult import SCHEDULED
    from django_celery_fulldbresult.models import TaskResultMeta

    def stamp(epoch: float) -> datetime:
        value = datetime.fromtimestamp(epoch, tz=timezone.utc)
        return value if settings.USE_TZ else value.replace(tzinfo=None)

    now = stamp(time.time())
    rows = [
        TaskResultMeta(
            task_id=task_id,
            task=TASK,
            status=SCHEDULED,
            args=[],
            kwargs={},
            queue=queue,
            eta=stamp(eta),
            date_submitted=now,
            date_modified=now,
        )
        for task_id, eta in zip(ids, etas, strict=True)
    ]
    TaskResultMeta.objects.bulk_create(rows, batch_size=2000)


def eta_epochs(ids: list[str]) -> dict[str, float]:
    from django_celery_fulldbresult.models import TaskResultMeta

    out: dict[str, float] = {}
    for part in chunks(ids):
        for task_id, eta in TaskResultMeta.objects.filter(task_id__in=part).values_list(
            "task_id", "eta"
        ):
            out[task_id] = _epoch(eta)
    return out


def _epoch(value: Any) -> float:
    from datetime import timezone

    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)  # the project stores UTC (TIME_ZONE)
    return value.timestamp()


def stale_task_ids(**delta: float) -> set[str]:
    """What ``manage.py find_stale_tasks --json`` reports (the command itself runs)."""
    return _command_ids("find_stale_tasks", **delta)


def stale_scheduled_ids(**delta: float) -> set[str]:
    return _command_ids("find_stale_scheduled_tasks", **delta)


def _command_ids(command: str, **delta: float) -> set[str]:
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command(command, json=True, stdout=out, **delta)
    return {row["task_id"] for row in json.loads(out.getvalue() or "[]")}


def real_ports() -> tuple[int, int]:
    """(database port, broker port) the project would use without a proxy."""
    from django.conf import settings
    from kombu import Connection

    from testproject.celery_app import app

    db_port = int(settings.DATABASES["default"]["PORT"])
    broker_port = Connection(app.conf.broker_url).port
    return db_port, int(broker_port)


@contextlib.contextmanager
def scheduling_on() -> Iterator[None]:
    """SCHEDULE_ETA + interception on this process's app (the children get the env knob)."""
    from django.test import override_settings

    from django_celery_fulldbresult import scheduler
    from testproject.celery_app import app

    installed = scheduler.is_installed(app)
    with override_settings(
        DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA=True,
        DJANGO_CELERY_FULLDBRESULT_MONKEY_PATCH_ASYNC=True,
    ):
        scheduler.install(app)
        try:
            yield
        finally:
            if not installed:
                scheduler.uninstall(app)
