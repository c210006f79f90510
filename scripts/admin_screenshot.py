#!/usr/bin/env python
"""Regenerate ``admin_screenshot.png`` (shown in the README) from real task runs.

Run from the repository root (``make screenshot``)::

    .venv/bin/python scripts/admin_screenshot.py

On SQLite + kombu's filesystem broker in ``testproject/var/screenshot`` (emptied
first), it starts a real worker, runs the demo project's tasks until the table holds
a realistic mix (SUCCESS, FAILURE, STARTED, SCHEDULED, REVOKED, PENDING), starts
``manage.py runserver``, logs in to the admin with headless Chromium (Debian's
package, driven by Playwright) and saves a full-page PNG of the changelist.
Nothing is left running afterwards.

Exit status: 0 on success, 1 on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = ROOT / "testproject" / "var" / "screenshot"
OUTPUT = ROOT / "admin_screenshot.png"
PYTHON = sys.executable
USERNAME, PASSWORD = "admin", "admin-screenshot"
CHANGELIST = "/admin/django_celery_fulldbresult/taskresultmeta/"
VIEWPORT = {"width": 1920, "height": 1080}
TIMEOUT = 60  # seconds for the worker, a task or the server

# The script always runs on its own SQLite file and broker folder.
for knob in ("FULLDB_BROKER_DIR", "FULLDB_TEST_DB", "FULLDB_DB_NAME", "FULLDB_BACKEND"):
    os.environ.pop(knob, None)
os.environ.update(
    {
        "FULLDB_STACK": "sqlite",
        "FULLDB_VAR_DIR": str(VAR_DIR),
        "FULLDB_QUEUE": "celery",
        "FULLDB_SCHEDULE_ETA": "1",  # eta/countdown calls wait in the database: SCHEDULED rows
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
)
sys.path.insert(0, str(ROOT))


def say(message: str) -> None:
    print(f"admin_screenshot: {message}", flush=True)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess in its own process group, killed with its children on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        # A warm shutdown would wait for the long task: whatever is left goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tasks() -> str:
    """Send the demo project's tasks and wait until each reached the state it is meant to show.

    Returns the id of a failed task that succeeds when retried.
    """
    from django_celery_fulldbresult.models import TaskResultMeta
    from django_celery_fulldbresult.scheduler import cancel_scheduled
    from testproject.demo import tasks

    def state(result: Any) -> str:
        row = TaskResultMeta.objects.filter(task_id=result.id).only("status").first()
        return row.status if row else ""

    def settle(result: Any, expected: str) -> None:
        wait_for(lambda: state(result) == expected, f"{result.id} to be {expected}")

    first = tasks.add.delay(2, 3)
    settle(first, "SUCCESS")  # the worker is up
    done = [
        tasks.add.delay(40, 2),
        tasks.echo.delay(
            datetime(2024, 2, 29, 13, 37, tzinfo=timezone.utc), Decimal("19.99"), note="héllo"
        ),
        tasks.flaky.delay(succeed_on=2),
        tasks.charge_card.delay("4111 1111 1111 1111", amount="12.50"),
        tasks.progress.delay(steps=3, pause=0.2),
        tasks.spawn.delay(count=2),
        tasks.tsum.delay([1, 2, 3, 4]),
    ]
    failed = [
        tasks.fail.delay("card declined"),
        tasks.read_file.delay("/srv/exports/report-2026-11.csv"),
        tasks.fail.delay("timeout talking to the payment provider"),
    ]
    export = VAR_DIR / "exports" / "report-2026-11.csv"
    recoverable = tasks.read_file.delay(str(export))
    running = tasks.sleep.delay(3600)
    waiting = [
        tasks.add.apply_async((5, 5), countdown=3600),
        tasks.echo.apply_async(("nightly report",), countdown=6 * 3600),
    ]
    cancelled = tasks.tsum.apply_async(([10, 20],), countdown=1800)
    nobody = tasks.add.apply_async((1, 1), queue="nobody")  # no worker reads it: PENDING
    for result in done:
        settle(result, "SUCCESS")
    for result in [*failed, recoverable]:
        settle(result, "FAILURE")
    export.parent.mkdir()
    export.write_text("month,total\n2026-11,1234\n")  # the retry finds it
    settle(running, "STARTED")
    for result in waiting:
        settle(result, "SCHEDULED")
    if not cancel_scheduled(cancelled.id):
        raise RuntimeError("the scheduled tsum could not be cancelled")
    settle(cancelled, "REVOKED")
    settle(nobody, "PENDING")
    say(f"{TaskResultMeta.objects.count()} task rows")
    return recoverable.id


def retry_in_admin(page: Any, task_id: str) -> None:
    """Retry a failed task with the admin's action, then wait for its copy to succeed."""
    from django_celery_fulldbresult.models import TaskResultMeta

    page.goto(f"{CHANGELIST}?q={task_id}")
    page.locator("#result_list input.action-select").check()
    page.select_option("select[name=action]", "retry_tasks")
    page.locator("button[name=index]").click()
    page.get_by_role("button", name=re.compile(r"^Yes,")).click()
    page.wait_for_url(re.compile(f"{CHANGELIST}[?]"))  # the action redirects to the same list
    wait_for(
        lambda: TaskResultMeta.objects.filter(retried_from=task_id, status="SUCCESS").exists(),
        f"the copy of {task_id} to succeed",
    )


def screenshot(base_url: str, retried: str) -> None:
    from playwright.sync_api import sync_playwright

    from testproject import browser as chromium

    # Playwright's sync API runs an asyncio loop in this thread; the ORM calls made
    # meanwhile are ordinary blocking calls, which Django would otherwise refuse here.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = chromium.launch(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT, base_url=base_url)
            # The admin's navigation sidebar, closed, leaves the table its full width.
            page.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
            page.set_default_timeout(TIMEOUT * 1000)
            page.goto(f"/admin/login/?next={CHANGELIST}")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.locator("#login-form [type=submit]").click()
            page.wait_for_url(f"**{CHANGELIST}")
            retry_in_admin(page, retried)
            page.goto(CHANGELIST)
            page.screenshot(path=str(OUTPUT), full_page=True)
        finally:
            browser.close()


def main() -> int:
    problem = None
    with contextlib.suppress(ImportError):
        from testproject import browser as chromium

        problem = chromium.missing()
    if problem:
        say(f"cannot take a screenshot: {problem}")
        return 1
    shutil.rmtree(VAR_DIR, ignore_errors=True)
    VAR_DIR.mkdir(parents=True)

    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    get_user_model().objects.create_superuser(USERNAME, "admin@example.com", PASSWORD)

    worker = [PYTHON, "-m", "celery", "-A", "testproject", "worker", "-P", "prefork", "-c", "3"]
    worker += ["-n", "shot@%h", "--loglevel=WARNING", "--without-mingle", "--without-gossip"]
    port = free_port()
    server = [PYTHON, "testproject/manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
    base_url = f"http://127.0.0.1:{port}"
    try:
        with process(worker, VAR_DIR / "worker.log"):
            say("worker started; running tasks")
            retried = run_tasks()
            with process(server, VAR_DIR / "server.log") as proc:
                wait_for(lambda: proc.poll() is not None or _responds(base_url), "runserver")
                if proc.poll() is not None:
                    raise RuntimeError(f"runserver exited; see {VAR_DIR / 'server.log'}")
                screenshot(base_url, retried)
    except Exception as exc:  # noqa: BLE001 (reported with the logs to look at)
        say(f"failed: {exc!r} (logs in {VAR_DIR})")
        return 1
    say(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


def _responds(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/admin/login/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
