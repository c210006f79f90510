"""Fixtures: a real Celery worker in a thread, real worker processes, and helpers.

The stack comes from ``FULLDB_STACK`` (see testproject/settings.py): SQLite +
filesystem broker by default, ``pg-rabbit`` or ``maria-redis`` in CI. A stack
that was asked for but cannot be reached fails the run instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connections

from django_celery_fulldbresult import heartbeat
from testproject.demo import tasks
from testproject.workers import worker_command

REPO = Path(__file__).resolve().parents[1]
STACK = os.environ.get("FULLDB_STACK", "sqlite")
#: Under CI a missing browser fails the browser tests instead of skipping them.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: Prefix of every queue a test uses, so that concurrent runs sharing a broker stay apart.
QUEUE_PREFIX = os.environ.get("FULLDB_QUEUE", "celery")


def queue_name(purpose: str) -> str:
    return f"{QUEUE_PREFIX}-{purpose}"


HELD = queue_name("held")  # no worker consumes it: what the scheduler forwards stays there


def run_script(source: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c source *args`` in a process of its own, on the test database with the
    testproject's settings (what it prints captured)."""
    return subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=REPO,
        env={
            **os.environ,
            "FULLDB_TEST_DB": "1",
            "PYTHONPATH": str(REPO),
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def vendor() -> str:
    return connections["default"].vendor


requires_server_db = pytest.mark.skipif(
    STACK == "sqlite", reason="needs a server database (FULLDB_STACK=pg-rabbit or maria-redis)"
)
requires_postgresql = pytest.mark.skipif(
    STACK != "pg-rabbit", reason="needs PostgreSQL (FULLDB_STACK=pg-rabbit)"
)


@pytest.fixture(scope="session")
def celery_app():
    from testproject.celery_app import app

    return app


@pytest.fixture(scope="session", autouse=True)
def _stack_reachable(celery_app):
    """Fail (never skip) when the selected broker cannot be reached."""
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3, interval_start=0.5)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"broker for FULLDB_STACK={STACK} is unreachable: {exc!r}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _close_dedicated_connections(django_db_setup):
    """Close the package's own connections before the test database is dropped."""
    yield
    from django_celery_fulldbresult import db

    db.close_all()


#: Whether ``apply_async`` waits for the PENDING row publish tracking writes behind.
_FLUSH_AFTER_PUBLISH = {"on": True}


def _flush_after_publish(**_: object) -> None:
    if _FLUSH_AFTER_PUBLISH["on"]:
        from django_celery_fulldbresult import publish

        assert publish.flush(60), "publish tracking's writer did not flush in 60 s"


@pytest.fixture(scope="session", autouse=True)
def _publish_rows_written_at_once():
    """``apply_async`` returns once its PENDING row is written, as in a user's tests (there
    tracking writes in ``apply_async`` itself, ``publish.writes_behind``): our suite runs
    with the package's own connection, where the row is written behind, by a thread. The
    rows still go through that thread; the ``written_behind`` fixture turns the wait off."""
    from celery.signals import after_task_publish

    after_task_publish.connect(_flush_after_publish, weak=False, dispatch_uid="tests.flush")
    yield
    after_task_publish.disconnect(dispatch_uid="tests.flush")


@pytest.fixture
def written_behind():
    """``apply_async`` returns before the PENDING row is written (the production path)."""
    _FLUSH_AFTER_PUBLISH["on"] = False
    yield
    _FLUSH_AFTER_PUBLISH["on"] = True


def _purge(app, names: list[str] | None = None) -> None:
    """Empty the app's queues (or the named ones): a killed worker may leave messages."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        queues = list(app.amqp.queues.values())
        queues += [app.amqp.queues[name] for name in names or ()]  # created if missing
        for queue in queues:
            queue.bind(channel).declare()
            queue.bind(channel).purge()


@pytest.fixture(scope="session")
def worker(django_db_setup, django_db_blocker, celery_app) -> Iterator[object]:
    """A real Celery worker (threads pool) consuming from the real broker in this process."""
    from celery.contrib.testing.worker import start_worker
    from celery.signals import task_prerun

    # As Django does per request: a thread's connection that died (the PostgreSQL restart
    # test) is replaced before the next task instead of failing it (CONN_HEALTH_CHECKS).
    task_prerun.connect(_fresh_connections, weak=False)
    _purge(celery_app)
    with (
        django_db_blocker.unblock(),
        start_worker(
            celery_app,
            pool="threads",
            concurrency=4,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as running,
    ):
        # Celery's test worker sends no worker_ready: its heartbeat starts here, as a real
        # worker's does (a live worker holds the tasks it took: receipt.py).
        heartbeat.on_worker_ready(sender=running.consumer)
        try:
            yield running
        finally:
            heartbeat.on_worker_shutdown()


@contextlib.contextmanager
def a_worker_commits_after_reads(alias: str, table: str) -> Iterator[list]:
    """While inside, after each SELECT on ``table`` this thread's ``alias`` connection
    sends, the real worker runs a task and commits its result before the next statement:
    what a busy worker does at the worst moment (unless the watched transaction already
    wrote: on SQLite it then holds the write lock). Published and awaited on another thread
    (its own connections, not the one being watched). Yields the results stored.

    On SQLite with Django's default (deferred) transactions, a transaction that read and
    then writes is refused at once ("database is locked") after such a commit."""
    connection = connections[alias]
    stored: list = []
    wrote = False  # the watched connection's current transaction wrote

    def commit_after_a_read(execute, sql, params, many, context):
        nonlocal wrote
        result = execute(sql, params, many, context)
        verb = sql.lstrip()[:6].upper()
        wrote = connection.in_atomic_block and (wrote or verb in ("INSERT", "UPDATE", "DELETE"))
        # Once its transaction wrote, it may hold SQLite's write lock: nobody commits then.
        if verb == "SELECT" and table in sql and not wrote:
            other = threading.Thread(
                target=lambda: stored.append(tasks.add.delay(2, 3).get(timeout=30))
            )
            other.start()
            other.join()
        return result

    with connection.execute_wrapper(commit_after_a_read):
        yield stored


#: The longest a test's end waits for the in-process worker to finish what it runs.
IDLE_TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _worker_idle_at_teardown(request):
    """A test that used the in-process worker ends once the worker has finished its tasks.

    ``get()`` returns when a result is stored, and the worker may still be in the rest of that
    task (a chord header's cleanup, in a transaction): Django's flush of a transactional test
    then deadlocked with it (TRUNCATE against the cleanup's DELETE). This fixture's teardown
    runs before pytest-django's (its autouse fixture is set up first)."""
    yield
    if "worker" not in request.fixturenames:
        return
    from celery.worker import state

    deadline = time.monotonic() + IDLE_TIMEOUT
    while state.active_requests and time.monotonic() < deadline:
        time.sleep(0.02)


def _fresh_connections(**_: object) -> None:
    """Only in the in-thread worker's pool threads (a test's own connection may be in a
    transaction)."""
    import threading

    from django.db import close_old_connections

    if threading.current_thread() is not threading.main_thread():
        close_old_connections()


class WorkerProcesses:
    """Starts ``celery worker`` subprocesses on the test database and stops them."""

    def __init__(self, log_dir: Path, app) -> None:
        self.log_dir = log_dir
        self.app = app
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        name: str = "w1",
        pool: str = "prefork",
        concurrency: int = 2,
        queues: str | None = None,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen:
        # The run's prefix in the node name: concurrent runs sharing a broker each declare
        # their workers' exclusive control queues ("<node>.celery.pidbox").
        cmd = worker_command(f"{name}@%h.{QUEUE_PREFIX}", queues, pool, concurrency, extra=extra)
        if queues:
            _purge(self.app, queues.split(","))
        full_env = {
            **os.environ,
            "FULLDB_TEST_DB": "1",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("w")
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        try:
            wait_for(lambda: " ready." in log_path.read_text() or proc.poll() is not None, 60)
        except AssertionError as exc:
            self.stop(proc)
            raise AssertionError(
                f"worker {name} did not start:\n{log_path.read_text()[-3000:]}"
            ) from exc
        if proc.poll() is not None:
            raise AssertionError(f"worker {name} exited:\n{log_path.read_text()[-3000:]}")
        return proc

    @staticmethod
    def wait_group_gone(proc: subprocess.Popen, timeout: float = 10.0) -> None:
        """Wait for the pool children too: they hold database sessions until they exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(proc)

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)
        for proc in self.procs:
            self.wait_group_gone(proc)


@pytest.fixture
def worker_processes(django_db_setup, tmp_path, celery_app) -> Iterator[WorkerProcesses]:
    _purge(celery_app)
    procs = WorkerProcesses(tmp_path, celery_app)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's package) driven by Playwright, one per test module.

    Playwright's sync API keeps an asyncio loop running in this thread, which makes
    Django refuse ORM calls here (SynchronousOnlyOperation) although they are plain
    blocking calls: DJANGO_ALLOW_ASYNC_UNSAFE lifts that while the browser lives, and
    the module scope keeps it away from the other test modules.
    """
    from testproject import browser as chromium

    problem = chromium.missing()
    if problem:
        if IN_CI:
            pytest.fail(f"browser tests cannot run under CI: {problem}", pytrace=False)
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            instance = chromium.launch(playwright)
            try:
                yield instance
            finally:
                instance.close()


@pytest.fixture
def scheduling_on(settings, celery_app):
    """The database ETA scheduler on (``ScheduledTask``), the held queue empty."""
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True
    with celery_app.connection_for_write() as conn:  # what an earlier failed run left there
        simple = conn.SimpleQueue(HELD)
        simple.clear()
        simple.close()
    yield settings


@pytest.fixture
def patched(scheduling_on, celery_app):
    """... and installed on the test app (as MONKEY_PATCH_ASYNC does): every call."""
    from django_celery_fulldbresult import scheduler

    scheduler.install(celery_app)
    yield scheduling_on
    scheduler.uninstall(celery_app)


@pytest.fixture
def task_db():
    """The connection the package writes through (for statement counts)."""
    from django_celery_fulldbresult import db

    alias = db.write_alias()
    connection = connections[alias]
    connection.ensure_connection()
    return connection


def take_messages(app, queue: str) -> list:
    """Every message left in ``queue``, taken off it (what was really published)."""
    taken = []
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, accept=["json", "pickle"])
        while True:
            try:
                message = simple.get(timeout=1)
            except simple.Empty:
                break
            message.ack()
            taken.append(message)
        simple.close()
    return taken
