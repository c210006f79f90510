#!/usr/bin/env python
"""End-to-end demo of django-celery-fulldbresult on SQLite + kombu's filesystem broker.

Run from the repository root (``make demo``)::

    .venv/bin/python scripts/demo.py

It starts real Celery workers and the ETA scheduler's sender (``manage.py
run_scheduler``) as subprocesses, sends a handful of tasks, shows delayed tasks
waiting as SCHEDULED rows until the sender forwards them (a retry with a
countdown, a cancelled task that never runs), prints what the task table holds
and which tasks ``find_stale_tasks`` reports, and ends with how to open the
admin on this data (``make admin``, scripts/demo_admin.py). Every run starts
from an empty folder, ``testproject/var/demo`` (database, broker folders, logs;
``$FULLDB_VAR_DIR/demo`` when that is set), and leaves no process behind.

Exit status: 0 on success, 1 when something did not behave as expected,
130 when interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: FULLDB_VAR_DIR as given (the admin hint repeats it); the demo's folder is a
#: subfolder of it, emptied at each run, so that nothing else in it is touched.
GIVEN_VAR_DIR = os.environ.get("FULLDB_VAR_DIR", "")
VAR_DIR = Path(GIVEN_VAR_DIR or ROOT / "testproject" / "var").absolute() / "demo"
WORKER_LOG = VAR_DIR / "worker.log"
DOOMED_LOG = VAR_DIR / "doomed-worker.log"
SENDER_LOG = VAR_DIR / "scheduler.log"
PIDFILE = VAR_DIR / "workers.pid"
PYTHON = sys.executable
HOST = socket.gethostname()  # what Celery puts in place of %h

HEARTBEAT = 2  # seconds between worker heartbeats (FULLDB_HEARTBEAT)
STALE_AFTER = 3  # find_stale_tasks --seconds
READY_TIMEOUT = 40  # seconds for a worker to run its first task
TASK_TIMEOUT = 20  # seconds for any one task of the demo
STOP_TIMEOUT = 15  # seconds a worker gets to shut down before SIGKILL
ADMIN_URL = "http://127.0.0.1:8000/admin/"  # where ``make admin`` serves it

# Environment of this process, the workers and the management commands. The
# knobs that would point the project elsewhere are dropped: the demo always runs
# on its own SQLite file and broker folder.
for knob in (
    "FULLDB_BROKER_DIR",
    "FULLDB_TEST_DB",
    "FULLDB_DB_NAME",
    "FULLDB_QUEUE",
    "FULLDB_BACKEND",
    "FULLDB_REDIS_DB",
):
    os.environ.pop(knob, None)
os.environ.update(
    {
        "FULLDB_STACK": "sqlite",
        "FULLDB_VAR_DIR": str(VAR_DIR),
        "FULLDB_HEARTBEAT": str(HEARTBEAT),
        # eta/countdown calls wait in the database (DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA
        # and MONKEY_PATCH_ASYNC in testproject/settings.py) until run_scheduler sends them.
        "FULLDB_SCHEDULE_ETA": "1",
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T0 = time.monotonic()


class DemoError(Exception):
    """Something did not behave as the demo expects; the message says what."""

    def __init__(self, message: str, show_log: bool = True) -> None:
        super().__init__(message)
        self.show_log = show_log


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {message}", flush=True)


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def rel(path: Path) -> Path:
    """``path`` relative to the repository when it is inside (FULLDB_VAR_DIR may not be)."""
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


# -- worker processes ---------------------------------------------------------


class Process:
    """A subprocess in a session (and process group) of its own, its output in ``log``."""

    def __init__(self, title: str, log: Path, args: list[str], stop_timeout: float) -> None:
        self.title = title  # "worker demo@host", "sender run_scheduler"
        self.stop_timeout = stop_timeout
        self.log = log
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its log as it happens
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Ctrl-C in the terminal reaches only this script, which then
                # stops the workers itself; the group (prefork children
                # included) can be killed as a whole.
                start_new_session=True,
            )
        with open(PIDFILE, "a") as pids:
            pids.write(f"{self.proc.pid}\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and not self.alive():
            raise DemoError(
                f"{self.title} exited with status {self.proc.returncode}; "
                f"last lines of {rel(self.log)}:\n{tail(self.log)}",
                show_log=False,
            )

    def kill(self) -> None:
        """SIGKILL the process and everything in its process group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown

    def wait_or_kill(self, deadline: float) -> str:
        if self.proc is None:
            return "not started"
        if self.proc.returncode is not None:
            how = f"already gone (status {self.proc.returncode})"
        else:
            try:
                self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                how = f"stopped (status {self.proc.returncode})"
            except subprocess.TimeoutExpired:
                how = "did not stop in time: killed"
        # Leftovers of the group (pool processes whose parent is gone).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return how


class Worker(Process):
    """A Celery worker of the test project."""

    def __init__(self, name: str, log: Path, *options: str, stop_timeout: float) -> None:
        self.label = f"{name}@{HOST}"
        args = [PYTHON, "-m", "celery", "-A", "testproject", "worker", *options]
        args += ["--loglevel=WARNING", "-n", f"{name}@%h"]
        super().__init__(f"worker {self.label}", log, args, stop_timeout)


def scheduler_sender() -> Process:
    """The ETA scheduler's sender: forwards each SCHEDULED row to the broker at its eta."""
    args = [PYTHON, "testproject/manage.py", "run_scheduler"]
    return Process("sender run_scheduler", SENDER_LOG, args, stop_timeout=5)


def stop_processes(processes: list[Process]) -> None:
    started = [p for p in processes if p.proc is not None]
    for process in started:
        process.terminate()
    now = time.monotonic()
    for process in started:
        say(f"{process.title}: {process.wait_or_kill(now + process.stop_timeout)}")
    with contextlib.suppress(OSError):
        PIDFILE.unlink()


def kill_leftovers() -> None:
    """Kill the workers (and sender) of an earlier run of this script that was itself killed.

    They would otherwise consume this run's messages from the recreated broker
    folder. Only the process groups recorded in the pidfile are touched, and
    only when they still run one of this script's worker command lines.
    """
    try:
        pids = [int(line) for line in PIDFILE.read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            done = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True)
        except OSError:  # no ps: nothing can be checked, so nothing is killed
            return
        command = done.stdout.decode(errors="replace").strip()
        ours = "celery" in command and ("demo@" in command or "doomed@" in command)
        if ours or "manage.py run_scheduler" in command:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                print(f"killed process {pid} left over by an earlier run of the demo")


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    workers: list[Process],
    interval: float = 0.1,
) -> Any:
    """Poll ``predicate`` until it returns a true value; fail at once if a process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for worker in workers:
            worker.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def sleep_until(when: float) -> None:
    """Sleep until the wall-clock time ``when`` (a timestamp)."""
    time.sleep(max(0.0, when - time.time()))


def manage(*args: str) -> str:
    """Run ``testproject/manage.py`` in a subprocess, as a user would."""
    done = subprocess.run(
        [PYTHON, "testproject/manage.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise DemoError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


# -- printing ---------------------------------------------------------------------


def short_name(task: str) -> str:
    return task.rsplit(".", 1)[-1] if task else "?"


def call_text(row: Any) -> str:
    if not row.replayable:
        return f"not stored (replayable=False); shown as {row.argsrepr} {row.kwargsrepr}"
    args, kwargs = row.get_call()
    return "(" + ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"


def print_table(rows: Any) -> None:
    print(
        f"  {'TASK ID':8}  {'TASK':11}  {'STATE':9}  {'RETRIES':7}  {'QUEUE':7}  "
        f"{'WORKER':14}  CALL AS STORED (row.get_call())"
    )
    for row in rows:
        print(
            f"  {row.task_id[:8]}  {short_name(row.task):11}  {row.status:9}  "
            f"{row.retries:<7}  {row.queue or '-':7}  {row.hostname or '-':14}  {call_text(row)}"
        )


# -- the demo -------------------------------------------------------------------


def show_scheduler(processes: list[Process]) -> None:
    """Delayed tasks wait as SCHEDULED rows, the sender forwards them at their eta, the
    worker runs them; a retry with a countdown waits the same way; a cancelled one never runs."""
    from celery import states
    from django.utils import timezone as dj_timezone

    from django_celery_fulldbresult import scheduler
    from django_celery_fulldbresult.models import TaskResultMeta
    from django_celery_fulldbresult.states import SCHEDULED, SCHEDULED_SENT
    from testproject.demo import tasks
    from testproject.demo.models import Run

    section("ETA scheduler: delayed tasks wait in the database, not in a worker")
    print("  countdown/eta calls become SCHEDULED rows; run_scheduler sends each one when due.")
    sent_at = dj_timezone.now()

    def since(when: datetime) -> str:
        return f"+{(when - sent_at).total_seconds():.2f}s"

    soon = tasks.add.apply_async((2, 2), countdown=2)
    at_eta = tasks.echo.apply_async(("at eta",), eta=sent_at + timedelta(seconds=3))
    cancelled = tasks.record_run.apply_async(("cancel me",), countdown=2)
    later = tasks.echo.apply_async(("in an hour",), countdown=3600)
    labels = {
        soon.id: "add(2, 2)",
        at_eta.id: "echo('at eta')",
        cancelled.id: "record_run('cancel me')",
        later.id: "echo('in an hour')",
    }
    say(
        "sent add(2, 2) countdown=2, echo('at eta') eta=now+3s, "
        "record_run('cancel me') countdown=2, echo('in an hour') countdown=3600"
    )
    waiting = list(TaskResultMeta.objects.filter(task_id__in=labels).order_by("eta", "id"))
    say("their rows in the task table (times: seconds since they were sent):")
    print(f"  {'TASK ID':8}  {'CALL':24}  {'STATE':9}  {'ETA':10}  QUEUE")
    for row in waiting:
        eta = since(row.eta) if row.eta else "-"
        print(
            f"  {row.task_id[:8]}  {labels[row.task_id]:24}  {row.status:9}  {eta:10}  {row.queue}"
        )
    if len(waiting) != len(labels) or any(row.status != SCHEDULED for row in waiting):
        raise DemoError(f"expected 4 SCHEDULED rows, found {[(r.task, r.status) for r in waiting]}")

    if not scheduler.cancel_scheduled(cancelled.id):
        raise DemoError("cancel_scheduled(record_run) returned False")
    say(
        "scheduler.cancel_scheduled(record_run('cancel me')) = True: REVOKED, never to be sent "
        "(the admin's Cancel action does the same)"
    )
    retried = tasks.flaky.delay(succeed_on=1, countdown=2)
    labels[retried.id] = "flaky(countdown=2)"
    say("sent flaky(succeed_on=1, countdown=2): its first attempt fails and retries 2s later")

    section("Their state changes, as the table shows them (polled every 20 ms)")
    last = {soon.id: (SCHEDULED, 0), at_eta.id: (SCHEDULED, 0)}  # (state, retries)
    watched = [soon, at_eta, retried]
    cancelled_eta = next(row.eta for row in waiting if row.task_id == cancelled.id)
    # A pass of the sender (it sleeps a second at most) after the cancelled task's eta.
    checked_after = cancelled_eta + timedelta(seconds=1.5)

    def describe(row: Any) -> str:
        if row.status == SCHEDULED and row.retries:
            n = row.retries
            return f"attempt {n} failed; retry {n} waits as a row until {since(row.eta)}"
        if row.status == SCHEDULED_SENT and row.eta:
            late = (row.date_modified - row.eta).total_seconds()
            return f"forwarded by run_scheduler {late:.2f}s after its eta"
        if row.status == states.STARTED:
            return f"attempt {row.retries + 1} on {row.hostname}"
        if row.status == states.SUCCESS:
            return f"= {row.get_result()!r}"
        if row.status == states.FAILURE and row.traceback:
            return row.traceback.strip().splitlines()[-1]
        return ""

    def changed() -> bool:
        rows = TaskResultMeta.objects.filter(task_id__in=[r.id for r in watched])
        for row in rows.order_by("date_modified", "id"):
            previous = last.get(row.task_id)
            if previous == (row.status, row.retries):
                continue
            last[row.task_id] = (row.status, row.retries)
            step = f"{previous[0]} -> {row.status}" if previous else row.status
            print(
                f"  {since(row.date_modified):>7}  {labels[row.task_id]:18}  {step:27}  "
                f"{describe(row)}",
                flush=True,
            )
        # Done from the rows just printed (not another read, which could see a final state
        # this pass did not print).
        finished = all(last.get(r.id, ("",))[0] in states.READY_STATES for r in watched)
        return finished and dj_timezone.now() > checked_after

    wait_for(changed, TASK_TIMEOUT, "the delayed tasks to run", processes, interval=0.02)

    if (soon.get(timeout=5), at_eta.get(timeout=5)) != (4, {"args": ["at eta"], "kwargs": {}}):
        raise DemoError(f"the delayed tasks returned {soon.result!r}, {at_eta.result!r}")
    flaky_row = TaskResultMeta.objects.get(task_id=retried.id)
    if retried.get(timeout=5) != "succeeded after 1 retries" or flaky_row.retries != 1:
        raise DemoError(f"flaky ended as {retried.result!r} with retries={flaky_row.retries}")
    done = TaskResultMeta.objects.filter(task_id__in=[r.id for r in watched])
    early = [labels[r.task_id] for r in done if not (r.date_started and r.date_started >= r.eta)]
    if early:
        raise DemoError(f"started before its eta: {', '.join(early)}")
    forwarded = sent_by_scheduler()
    if forwarded != len(watched):
        raise DemoError(f"run_scheduler's log says it sent {forwarded} tasks, not {len(watched)}")
    say(f"run_scheduler forwarded {forwarded} tasks (its log: {rel(SENDER_LOG)})")
    say("add, echo and flaky's retry each started after its eta, not before")

    row = TaskResultMeta.objects.get(task_id=cancelled.id)
    if row.status != states.REVOKED or Run.objects.filter(task_id=cancelled.id).exists():
        raise DemoError(f"the cancelled record_run is {row.status} or ran")
    past = (dj_timezone.now() - row.eta).total_seconds()
    say(
        f"record_run('cancel me') was cancelled: its eta passed {past:.1f}s ago, it is still "
        "REVOKED and never ran (it records every run: none)"
    )
    say("echo('in an hour') stays SCHEDULED: see it in the admin (Cancel, Send now)")


def sent_by_scheduler() -> int:
    """How many tasks run_scheduler says it sent (its "sent N, expired ..." lines)."""
    lines = tail(SENDER_LOG, lines=10_000).splitlines()
    return sum(int(line.split()[1].rstrip(",")) for line in lines if line.startswith("sent "))


def run_demo(demo_worker: Worker, doomed_worker: Worker, sender: Process) -> None:
    # Django is set up only now: the settings create the (just emptied) var folder.
    import django

    django.setup()

    from celery import states
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone as dj_timezone

    from django_celery_fulldbresult import conf, heartbeat
    from django_celery_fulldbresult.models import TaskResultMeta, WorkerHeartbeat
    from testproject.demo import tasks

    workers: list[Process] = [demo_worker, doomed_worker, sender]
    # A worker counts as gone after GRACE missed heartbeats (heartbeat.live_hostnames).
    beat_every, grace = heartbeat.interval(), int(conf.get("WORKER_HEARTBEAT_GRACE"))
    if beat_every <= 0:
        raise DemoError("worker heartbeats are off: set FULLDB_HEARTBEAT to a positive number")

    def collect(result: Any, propagate: bool = True) -> Any:
        wait_for(result.ready, TASK_TIMEOUT, f"task {result.id}", workers)
        return result.get(timeout=5, propagate=propagate)

    def row(result: Any) -> Any:
        return TaskResultMeta.objects.get(task_id=result.id)

    section("Setup")
    say(f"SQLite + kombu's filesystem broker, all in {rel(VAR_DIR)}/ (emptied)")
    call_command("migrate", verbosity=0, interactive=False)
    say("database migrated")
    demo_worker.start()
    say(f"started worker {demo_worker.label}: prefork, 2 processes -> {rel(WORKER_LOG)}")
    doomed_worker.start()
    say(f"started worker {doomed_worker.label}: solo, queue 'doomed' -> {rel(DOOMED_LOG)}")
    sender.start()
    say(f"started the ETA scheduler's sender: manage.py run_scheduler -> {rel(SENDER_LOG)}")

    # Sent at once so that it starts as soon as its worker is up.
    doomed = tasks.sleep.apply_async((60,), queue="doomed")
    ping = tasks.add.delay(2, 3)
    wait_for(ping.ready, READY_TIMEOUT, f"worker {demo_worker.label} to run add(2, 3)", workers)
    if ping.get(timeout=5) != 5:
        raise DemoError(f"add(2, 3) returned {ping.result!r}")
    say(f"worker {demo_worker.label} is ready: add(2, 3) = 5")

    section("Tasks")
    when = datetime(2024, 2, 29, 13, 37, 0, 123456, tzinfo=timezone.utc)
    echo_args = (when, Decimal("19.99"), uuid.UUID("12345678-1234-5678-1234-567812345678"))
    echo_kwargs = {"blob": b"\x00\xffraw bytes", "note": "héllo"}
    added = tasks.add.delay(40, 2)
    echoed = tasks.echo.delay(*echo_args, **echo_kwargs)
    failed = tasks.fail.delay("card declined")
    flaky = tasks.flaky.delay(succeed_on=2)
    charged = tasks.charge_card.delay("4111 1111 1111 1111", amount="12.50")
    nobody = tasks.add.apply_async((1, 1), queue="nobody")
    say("sent add, echo, fail, flaky, charge_card, and add(1, 1) to queue 'nobody'")

    say(f"add(40, 2) = {collect(added)!r}")

    value = collect(echoed)
    same = value == {"args": list(echo_args), "kwargs": echo_kwargs}
    say(f"echo(datetime, Decimal, UUID, blob=bytes, note=str) returned its arguments: {same}")
    if not same:
        raise DemoError(f"echo returned {value!r}")

    exc = collect(failed, propagate=False)
    say(f"fail('card declined') -> {failed.state}: {exc!r}")
    if failed.state != "FAILURE" or "ValueError: card declined" not in (
        row(failed).traceback or ""
    ):
        raise DemoError(f"fail ended in {failed.state}, traceback {row(failed).traceback!r}")

    say(f"flaky(succeed_on=2) = {collect(flaky)!r}")
    if row(flaky).retries != 2:
        raise DemoError(f"flaky row has retries={row(flaky).retries}, expected 2")

    say(f"charge_card('4111 1111 1111 1111', amount='12.50') = {collect(charged)!r}")
    if row(charged).replayable or row(charged).args is not None:
        raise DemoError("the arguments of charge_card were stored")

    # The progress task reports a custom state; watch it from here.
    progressing = tasks.progress.delay(steps=3, pause=0.4)
    seen: list[str] = []

    def progressed() -> bool:
        meta = progressing.backend.get_task_meta(progressing.id)  # state and info, one read
        state = meta["status"]
        label = f"{state} {meta['result']}" if state == "PROGRESS" else state
        if not seen or seen[-1] != label:
            seen.append(label)
        return state in states.READY_STATES

    wait_for(progressed, TASK_TIMEOUT, "the progress task", workers, interval=0.05)
    say(f"progress(steps=3) = {progressing.get(timeout=5)!r}; states seen by the client:")
    for label in seen:
        print(f"           {label}")

    # The task of the doomed worker must be running (STARTED) before the kill.
    started = wait_for(
        lambda: TaskResultMeta.objects.filter(task_id=doomed.id, status="STARTED").first(),
        READY_TIMEOUT,
        f"sleep(60) to start on worker {doomed_worker.label}",
        workers,
    )
    say(f"sleep(60) is STARTED on worker {started.hostname}")

    section("How echo's call is stored: JSON with kombu's typed envelopes")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT args, kwargs FROM django_celery_fulldbresult_taskresultmeta WHERE task_id = %s",
            [echoed.id],
        )
        raw_args, raw_kwargs = cursor.fetchone()
    print(f"  args   = {raw_args}")
    print(f"  kwargs = {raw_kwargs}")
    same = row(echoed).get_call() == (list(echo_args), echo_kwargs)
    print(f"  row.get_call() == what was sent: {same}")
    if not same:
        raise DemoError(f"the echo row holds {row(echoed).get_call()!r}")

    show_scheduler(workers)

    section(f"Stale tasks (--seconds {STALE_AFTER}) while worker {doomed_worker.label} lives")
    # Both unfinished rows must be older than the threshold: the STARTED one is
    # still not stale, because its worker sends heartbeats.
    nobody_row = row(nobody)
    newest = max(started.date_modified, nobody_row.date_modified).timestamp()
    sleep_until(newest + STALE_AFTER + 0.5)
    stale = list(TaskResultMeta.objects.get_stale_tasks(timedelta(seconds=STALE_AFTER)))
    age = time.time() - started.date_modified.timestamp()
    say(f"sleep(60) has been STARTED for {age:.1f}s; stale tasks:")
    for task in stale:
        print(f"           {task.task_id[:8]} {short_name(task.task)} {task.status}")
    if {task.task_id for task in stale} != {nobody.id}:
        raise DemoError("expected add(1, 1) on queue 'nobody' to be the only stale task")
    say("only add(1, 1) (queue 'nobody', PENDING): a task whose worker lives is not stale")

    section(f"Killing worker {doomed_worker.label} (SIGKILL)")
    doomed_worker.kill()
    killed_at = time.time()
    say(f"killed; its task stays {doomed.state} and its heartbeats stop")
    last_seen = WorkerHeartbeat.objects.get(hostname=started.hostname).last_seen.timestamp()
    gone_at = last_seen + beat_every * grace + 0.5
    say(
        f"last heartbeat {killed_at - last_seen:.1f}s before the kill; a worker is gone "
        f"{beat_every * grace:g}s ({grace} x {beat_every:g}s) after its last heartbeat: "
        f"waiting {max(0.0, gone_at - time.time()):.1f}s"
    )
    sleep_until(gone_at)

    section("The task table, one row per task")
    print_table(TaskResultMeta.objects.order_by("date_submitted", "id"))

    section("Worker heartbeats")
    now = dj_timezone.now()
    for beat in WorkerHeartbeat.objects.order_by("hostname"):
        age = (now - beat.last_seen).total_seconds()
        status = "alive" if age <= beat_every * grace else "gone"
        print(f"  {beat.hostname:14}  last seen {age:4.1f}s ago: {status}")

    section(f"python testproject/manage.py find_stale_tasks --seconds {STALE_AFTER}")
    print(manage("find_stale_tasks", "--seconds", str(STALE_AFTER)).rstrip())

    section(f"python testproject/manage.py find_stale_tasks --seconds {STALE_AFTER} --json")
    items = json.loads(manage("find_stale_tasks", "--seconds", str(STALE_AFTER), "--json"))
    for item in items:
        print(f"  {json.dumps(item)}")

    found, expected = {item["task_id"] for item in items}, {nobody.id, doomed.id}
    if found != expected:
        raise DemoError(
            f"find_stale_tasks reported {sorted(found)}, expected {sorted(expected)}: "
            "add(1, 1) on queue 'nobody' and sleep(60) of the killed worker"
        )
    say("stale: add(1, 1), never picked up (PENDING); sleep(60), lost with its worker (STARTED)")


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and SIGTERM stop the demo through the cleanup below (even when
    # the parent started this script with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupted)
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and stderr in order
    kill_leftovers()
    shutil.rmtree(VAR_DIR, ignore_errors=True)
    VAR_DIR.mkdir(parents=True)

    demo_worker = Worker("demo", WORKER_LOG, "-P", "prefork", "-c", "2", stop_timeout=STOP_TIMEOUT)
    # A warm shutdown waits for the running task, sleep(60): no use waiting long.
    doomed_worker = Worker("doomed", DOOMED_LOG, "-P", "solo", "-Q", "doomed", stop_timeout=2)
    sender = scheduler_sender()
    status = 0
    try:
        run_demo(demo_worker, doomed_worker, sender)
    except DemoError as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        if exc.show_log:
            print(f"last lines of {rel(WORKER_LOG)}:\n{tail(WORKER_LOG)}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\nDEMO INTERRUPTED", file=sys.stderr)
        status = 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"\nDEMO FAILED: {exc!r}", file=sys.stderr)
        print(f"last lines of {rel(WORKER_LOG)}:\n{tail(WORKER_LOG)}", file=sys.stderr)
        status = 1
    finally:
        # The cleanup is bounded (STOP_TIMEOUT, then SIGKILL): no second
        # Ctrl-C may cut it short and leave workers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        section("Stopping the workers and the sender (SIGTERM, SIGKILL after a timeout)")
        stop_processes([demo_worker, doomed_worker, sender])
    say("demo finished" if status == 0 else f"demo failed (exit status {status})")
    if status == 0:
        admin_hint()
    return status


def admin_hint() -> None:
    """How to open the admin on what the demo left in its database."""
    command = f"FULLDB_VAR_DIR={VAR_DIR.parent} make admin" if GIVEN_VAR_DIR else "make admin"
    section("Next: the admin on this data")
    print(f"  {command}    # demo superuser admin / password admin (this local database only)")
    print(f"  then open {ADMIN_URL} (Ctrl-C stops the server)")


if __name__ == "__main__":
    sys.exit(main())
