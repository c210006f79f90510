"""``make demo`` end to end (scripts/demo.py in a subprocess, as a newcomer runs it) and
``make admin``'s preparation (scripts/demo_admin.py: the demo superuser, then the admin
served on the demo's database).

The demo always runs on SQLite + the filesystem broker, whatever FULLDB_STACK says: it
runs here in the SQLite stage only, in a folder of its own (FULLDB_VAR_DIR)."""

from __future__ import annotations

import contextlib
import html
import http.cookiejar
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, STACK

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(STACK != "sqlite", reason="the demo runs on SQLite whatever the stack"),
]

TABLE = "django_celery_fulldbresult_taskresultmeta"
CHANGELIST = "/admin/django_celery_fulldbresult/taskresultmeta/"


def _env(var_dir: Path) -> dict[str, str]:
    """A newcomer's environment: none of the suite's knobs, the demo's folder in var_dir."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FULLDB_", "DJANGO_", "CELERY_"))
    }
    env["FULLDB_VAR_DIR"] = str(var_dir)
    return env


def _script(name: str, var_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=REPO,
        env=_env(var_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    var_dir = tmp_path_factory.mktemp("demo-var")
    return _script("demo.py", var_dir), var_dir


def _database(var_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(var_dir / "demo" / "fulldbresult.sqlite3")


def test_demo_shows_the_scheduler_and_ends_with_the_admin(demo):
    run, var_dir = demo
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-4000:]
    assert run.stderr == ""  # no traceback, no warning banner
    assert "warning" not in out.lower()

    # The delayed calls wait as SCHEDULED rows, printed from the table.
    for call, eta in [
        (r"add\(2, 2\)", r"\+2\.\d\ds"),
        (r"record_run\('cancel me'\)", r"\+2\.\d\ds"),
        (r"echo\('at eta'\)", r"\+3\.\d\ds"),
        (r"echo\('in an hour'\)", r"\+3600\.\d\ds"),
    ]:
        assert re.search(rf"^  [0-9a-f]{{8}}  {call} +SCHEDULED  {eta} +celery$", out, re.M), call
    # Forwarded at their eta by run_scheduler (its log counts them; the table is polled, so
    # a state the worker overwrites within milliseconds may go unseen), then run by the worker.
    assert "run_scheduler forwarded 3 tasks" in out
    assert re.search(r"SCHEDULED -> SCHEDULED_SENT +forwarded by run_scheduler 0\.\d\ds after", out)
    for call, result in [(r"add\(2, 2\)", "= 4"), (r"echo\('at eta'\)", "= {'args'")]:
        assert re.search(rf"{call} +\w+ -> SUCCESS +{re.escape(result)}", out), call
    assert "add, echo and flaky's retry each started after its eta, not before" in out
    # The retry with a countdown waits as a row, then runs.
    assert re.search(
        r"flaky\(countdown=2\) +\w+ -> SCHEDULED +attempt 1 failed; retry 1 waits", out
    )
    assert re.search(r"flaky\(countdown=2\) +\w+ -> SUCCESS += 'succeeded after 1 retries'", out)
    # The cancelled one never runs.
    assert "cancel_scheduled(record_run('cancel me')) = True" in out
    assert re.search(
        r"record_run\('cancel me'\) was cancelled: .* still REVOKED and never ran", out
    )
    # Ends with how to open the admin on this data.
    hint = out[out.index("=== Next: the admin on this data ===") :].splitlines()
    assert hint[1].strip().startswith(f"FULLDB_VAR_DIR={var_dir} make admin")
    assert "admin / password admin" in hint[1]
    assert "http://127.0.0.1:8000/admin/" in hint[2]
    assert not (var_dir / "demo" / "workers.pid").exists()  # every process stopped

    # What the output says is what the table holds.
    with contextlib.closing(_database(var_dir)) as db:
        rows = dict(db.execute(f"SELECT argsrepr, status FROM {TABLE} WHERE task LIKE '%echo'"))
        assert rows["('in an hour',)"] == "SCHEDULED"
        assert rows["('at eta',)"] == "SUCCESS"
        cancelled = db.execute(f"SELECT status FROM {TABLE} WHERE task LIKE '%record_run'")
        assert cancelled.fetchall() == [("REVOKED",)]
        assert db.execute("SELECT COUNT(*) FROM demo_run").fetchone() == (0,)  # never ran
        retried = db.execute(
            f"SELECT status, retries FROM {TABLE} WHERE task LIKE '%flaky' AND kwargs LIKE "
            "'%countdown%'"
        )
        assert retried.fetchall() == [("SUCCESS", 1)]


def test_make_admin_prepares_the_superuser(demo):
    run, var_dir = demo
    assert run.returncode == 0
    first = _script("demo_admin.py", var_dir, "--prepare-only")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "superuser 'admin' created" in first.stdout
    assert "log in as admin / admin" in first.stdout
    with contextlib.closing(_database(var_dir)) as db, db:
        user = db.execute("SELECT is_superuser, is_staff, is_active FROM auth_user").fetchall()
        assert user == [(1, 1, 1)]
        db.execute("UPDATE auth_user SET password = '!', is_active = 0")  # a lost password
    again = _script("demo_admin.py", var_dir, "--prepare-only")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "superuser 'admin' password reset" in again.stdout

    # make admin: the admin, logged in as admin/admin, shows the demo's rows.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "scripts/demo_admin.py", f"127.0.0.1:{port}"],
        cwd=REPO,
        env=_env(var_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        login = _get(opener, f"{base}/admin/login/?next={CHANGELIST}", server)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login).group(1)
        form = {"csrfmiddlewaretoken": token, "username": "admin", "password": "admin"}
        form["next"] = CHANGELIST
        request = urllib.request.Request(
            f"{base}/admin/login/?next={CHANGELIST}",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Referer": f"{base}/admin/login/"},
        )
        with opener.open(request, timeout=10) as response:
            page = html.unescape(response.read().decode())
            assert response.url == f"{base}{CHANGELIST}", page[-2000:]
        for text in ("SCHEDULED", "REVOKED", "STARTED", "PENDING", "testproject.demo.tasks.echo"):
            assert text in page, text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=10)[0]
    assert "open http://127.0.0.1:" in output
    assert "WARNING" not in output  # runserver's banner is hidden


def _get(opener, url: str, server: subprocess.Popen, timeout: float = 30) -> str:
    """The page at url, once the server answers; fail at once if it exited."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            pytest.fail(f"demo_admin.py exited {server.returncode}: {server.stdout.read()}")
        try:
            with opener.open(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_make_admin_before_the_demo_says_to_run_it(tmp_path):
    run = _script("demo_admin.py", tmp_path)  # no --prepare-only: it must not serve anything
    assert run.returncode == 1
    assert "run `make demo` first" in run.stderr
    assert "runserver" not in run.stdout + run.stderr
    assert not (tmp_path / "demo" / "fulldbresult.sqlite3").exists()
