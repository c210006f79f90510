"""Scenario 7: bad input. Each case gets a clear error or a documented behaviour, and no
admin page, command or sender crashes on a bad row while the rest of the table is served.

``python -m soak.badinput --tz-child`` runs the naive-datetime checks in a process of its
own (``FULLDB_USE_TZ`` decides USE_TZ at start-up) and prints its problems as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

from . import harness
from .harness import Context, Outcome

BIG = 10 * 1024 * 1024
UNKNOWN_TASK = "soak.no_such_task"


def _models() -> tuple[Any, Any]:
    from django_celery_fulldbresult.models import TaskResultMeta
    from testproject.celery_app import app

    return TaskResultMeta, app


def _row(task_id: str) -> Any:
    TaskResultMeta, _ = _models()
    return TaskResultMeta.objects.get(task_id=task_id)


def _due_now(task_ids: list[str]) -> None:
    """Make scheduled rows due (as if their eta had come)."""
    TaskResultMeta, _ = _models()
    from django.utils import timezone as dj_timezone

    past = dj_timezone.now() - timedelta(seconds=1)
    TaskResultMeta.objects.filter(task_id__in=task_ids).update(eta=past)


def _scheduled(task: Any, queue: str, *args: Any, **options: Any) -> str:
    return task.apply_async(args=list(args), queue=queue, countdown=3600, **options).id


def make_bad_rows(ctx: Context, out: Outcome) -> dict[str, str]:
    """Publish or write every kind of bad input; return label -> task id."""
    from testproject.demo.tasks import echo, soak_size, soak_step

    TaskResultMeta, app = _models()
    queue = ctx.queue
    ids: dict[str, str] = {}
    with harness.scheduling_on():
        # Values JSON cannot hold, sent with the pickle serializer: packed, not lost.
        ids["pickle_args"] = _scheduled(echo, queue, Fraction(1, 3), serializer="pickle")
        row = _row(ids["pickle_args"])
        out.check(row.packed_args is not None, "pickle args were not packed")
        out.check(
            row.get_call(accept=["pickle"]) == ([Fraction(1, 3)], {}),
            "packed pickle args do not round-trip",
        )
        try:
            row.get_call(accept=["json"])
            out.problems.append("pickled args decoded although pickle is not accepted")
        except Exception as exc:  # noqa: BLE001
            out.check("ContentDisallowed" in type(exc).__name__, f"unclear error {exc!r}")
        # 10 MB of arguments, scheduled and immediate (tracked).
        ids["big_scheduled"] = _scheduled(soak_size, queue, "x" * BIG)
        ids["big_now"] = soak_size.apply_async(args=["y" * BIG], queue=queue).id
        # Unknown task name, scheduled and immediate.
        ids["unknown_scheduled"] = app.send_task(UNKNOWN_TASK, queue=queue, countdown=3600).id
        ids["unknown_now"] = app.send_task(UNKNOWN_TASK, queue=queue).id
        # Eta far in the past: sent at once. Year 9999: waits, harmlessly.
        ids["eta_past"] = soak_step.apply_async(
            queue=queue, eta=datetime(1971, 1, 1, tzinfo=timezone.utc)
        ).id
        ids["eta_9999"] = soak_step.apply_async(
            queue=queue, eta=datetime(9999, 12, 31, 23, 0, tzinfo=timezone.utc)
        ).id
        # Rows whose stored data is corrupt (written behind the package's back).
        for label, column, value in (
            ("bad_envelope", "args", [{"__type__": "datetime", "__value__": "not a date"}]),
            ("args_not_list", "args", "not a list"),
            ("kwargs_not_dict", "kwargs", [1, 2]),
            ("options_not_dict", "options", "oops"),
        ):
            ids[label] = _scheduled(soak_step, queue)
            TaskResultMeta.objects.filter(task_id=ids[label]).update(**{column: value})
        ids["bad_packed"] = _scheduled(soak_step, queue)
        TaskResultMeta.objects.filter(task_id=ids["bad_packed"]).update(
            args=None, packed_args=b"\x80garbage", packed_args_content_type="application/json"
        )
        ids["bad_result"] = f"bad-result-{uuid.uuid4()}"
        TaskResultMeta.objects.create(
            task_id=ids["bad_result"],
            task="testproject.demo.tasks.soak_step",
            status="SUCCESS",
            result="{not json",
            content_type="application/json",
            content_encoding="utf-8",
        )
        ids["pickled_result"] = f"pickled-result-{uuid.uuid4()}"
        TaskResultMeta.objects.create(
            task_id=ids["pickled_result"],
            task="testproject.demo.tasks.soak_step",
            status="SUCCESS",
            result="gASVBAAAAAAAAACMAWGULg==",  # pickle of "a", base64
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
    return ids


def check_admin(out: Outcome, ids: dict[str, str]) -> None:
    from django.contrib.auth import get_user_model
    from django.test import Client

    TaskResultMeta, _ = _models()
    user, _ = get_user_model().objects.get_or_create(
        username="soak-admin", defaults={"is_superuser": True, "is_staff": True}
    )
    client = Client()
    client.force_login(user)
    base = "/admin/django_celery_fulldbresult/taskresultmeta/"
    pages = [base, f"{base}?status__exact=SCHEDULED", f"{base}?q=soak"]
    for pk in TaskResultMeta.objects.filter(task_id__in=ids.values()).values_list("pk", flat=True):
        pages.append(f"{base}{pk}/change/")
    failures = []
    for page in pages:
        try:
            status = client.get(page).status_code
        except Exception as exc:  # noqa: BLE001 - a crash is the finding
            status = repr(exc)[:120]
        if status != 200:
            failures.append(f"{page} -> {status}")
    out.check(not failures, f"admin pages failed: {failures[:3]}")
    out.figures["admin_pages"] = len(pages)


def check_commands(ctx: Context, out: Outcome, ids: dict[str, str]) -> None:
    for command in ("find_stale_tasks", "find_stale_scheduled_tasks"):
        for as_json in (False, True):
            try:
                harness._command_ids(command) if as_json else _run_text(command)
            except Exception as exc:  # noqa: BLE001
                out.problems.append(f"{command} crashed: {exc!r}")
    stale = harness.stale_task_ids(seconds=0)
    out.check(ids["unknown_now"] not in stale, "an unknown task (FAILURE) is reported stale")
    out.check(ids["eta_9999"] not in stale, "the year-9999 task is reported stale")


def _run_text(command: str) -> None:
    import io

    from django.core.management import call_command

    call_command(command, stdout=io.StringIO())


def run_scheduler_once(ctx: Context, folder: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "testproject/manage.py", "run_scheduler", "--once"],
        cwd=harness.REPO,
        env=ctx.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def run(ctx: Context) -> Outcome:
    TaskResultMeta, app = _models()
    out = Outcome("7 bad-input")
    folder = ctx.folder("bad-input")
    harness.purge(app, ctx.queue)
    with harness.stopping_all(ctx):
        harness.start_worker(ctx, "bad-worker", folder, "prefork", 2)
        ids = make_bad_rows(ctx, out)
        good = [f"good-{uuid.uuid4()}" for _ in range(5)]
        harness.scheduled_rows(good, ctx.queue, [time.time() - 1] * len(good))
        due = [ids[k] for k in ids if k.endswith(("_scheduled", "_args")) or "_not_" in k]
        due += [ids["bad_envelope"], ids["bad_packed"]]
        _due_now(due)
        check_admin(out, ids)
        once = run_scheduler_once(ctx, folder)
        out.check(once.returncode == 0, f"run_scheduler --once failed: {once.stderr[-300:]}")
        sent_good = harness.wait_until(
            lambda: harness.count_in(good, status="SUCCESS") == len(good), 60
        )
        out.check(sent_good, "good rows next to bad ones were not sent")
        # A daemon sender keeps serving the table after meeting the bad rows.
        sender = harness.start_sender(ctx, "sender", folder)
        later = [f"later-{uuid.uuid4()}" for _ in range(5)]
        harness.scheduled_rows(later, ctx.queue, [time.time() + 1] * len(later))
        served = harness.wait_until(
            lambda: harness.count_in(later, status="SUCCESS") == len(later), 60
        )
        out.check(served and sender.poll() is None, "the sender stopped serving after bad rows")
        done = harness.wait_until(
            lambda: (
                harness.count_in(
                    [ids["big_scheduled"], ids["big_now"], ids["eta_past"]], status="SUCCESS"
                )
                == 3
            ),
            120,
        )
        out.check(done, "the 10 MB or past-eta tasks did not finish")
        check_admin(out, ids)
        check_commands(ctx, out, ids)
        sender_log = harness.log_text(sender)
    check_rows(out, ids)
    out.check("Traceback" not in sender_log, "the sender logged a traceback")
    for use_tz in ("1", "0"):
        problems = tz_child(ctx, use_tz)
        out.problems += [f"USE_TZ={use_tz}: {p}" for p in problems]
    out.figures["cases"] = len(ids) + 2
    return out


def check_rows(out: Outcome, ids: dict[str, str]) -> None:
    """Each bad row ended in its documented state with a clear reason."""
    _, app = _models()
    expect_failure = ("pickle_args", "bad_envelope", "args_not_list", "kwargs_not_dict")
    expect_failure += ("options_not_dict", "bad_packed")
    for label in expect_failure:
        row = _row(ids[label])
        ok = row.status == "FAILURE" and "cannot forward" in (row.traceback or "")
        out.check(ok, f"{label}: {row.status} {(row.traceback or '')[:80]!r}")
    big = _row(ids["big_scheduled"])
    out.check(big.get_result() == BIG, "10 MB scheduled task: wrong result")
    out.check(_row(ids["big_now"]).get_result() == BIG, "10 MB task: wrong result")
    out.check(_row(ids["eta_past"]).status == "SUCCESS", "past eta: not run")
    out.check(_row(ids["eta_9999"]).status == "SCHEDULED", "year 9999: not waiting")
    # Celery's worker records an unregistered task as FAILURE(NotRegistered).
    for label in ("unknown_now", "unknown_scheduled"):
        row = _row(ids[label])
        out.check(row.status == "FAILURE", f"{label}: {row.status}")
        out.check("NotRegistered" in (row.result or ""), f"{label}: result {row.result!r:.80}")
    # Documented: a result that cannot be decoded (corrupt, or pickle not accepted) raises
    # kombu's DecodeError / ContentDisallowed from AsyncResult, as Celery's own backends do.
    for label in ("bad_result", "pickled_result"):
        try:
            app.AsyncResult(ids[label]).result  # noqa: B018 - decoding is what is tested
            out.problems.append(f"{label}: decoded although corrupt or not accepted")
        except Exception as exc:  # noqa: BLE001
            name = type(exc).__name__
            out.check(name in ("DecodeError", "ContentDisallowed"), f"{label}: {exc!r}")
    for label in ("bad_envelope", "args_not_list"):
        try:
            state = app.AsyncResult(ids[label]).state
        except Exception as exc:  # noqa: BLE001
            state = repr(exc)
        out.check(state == "FAILURE", f"{label}: AsyncResult.state gave {state}")


# -- naive datetimes, in a process of their own ---------------------------------------


def tz_child(ctx: Context, use_tz: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "soak.badinput", "--tz-child"],
        cwd=harness.REPO,
        env=ctx.env(FULLDB_USE_TZ=use_tz),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"tz child crashed: {proc.stderr[-400:]}"]


def tz_checks() -> list[str]:
    """Naive datetimes as eta and in arguments, with this process's USE_TZ."""
    from django.conf import settings
    from django.utils import timezone as dj_timezone

    from django_celery_fulldbresult import scheduler
    from testproject.demo.tasks import echo

    TaskResultMeta, app = _models()
    problems: list[str] = []
    naive_eta = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0) + timedelta(hours=1)
    naive_arg = datetime(2020, 5, 17, 12, 30)
    with harness.scheduling_on():
        task_id = echo.apply_async(args=[naive_arg], eta=naive_eta, queue="soak-tz-unused").id
    row = TaskResultMeta.objects.get(task_id=task_id)
    expected = naive_eta  # a naive eta is in the app's timezone (UTC here)
    if settings.USE_TZ:
        expected = dj_timezone.make_aware(naive_eta, timezone.utc)
    if row.eta != expected:
        problems.append(f"naive eta stored as {row.eta!r}, expected {expected!r}")
    if row.get_call() != ([naive_arg], {}):
        problems.append(f"naive datetime argument came back as {row.get_call()!r}")
    # Due by the database clock, in the form Django stores datetimes.
    TaskResultMeta.objects.filter(task_id=task_id).update(
        eta=dj_timezone.now() - timedelta(seconds=5)
    )
    if task_id not in _claim_and_release():
        problems.append("a due row was not claimed")
    TaskResultMeta.objects.filter(task_id=task_id).update(
        eta=dj_timezone.now() + timedelta(hours=1)
    )
    if task_id in _claim_and_release():
        problems.append("a row due in an hour was claimed")
    if scheduler.seconds_until_next("default", cap=5.0) > 5.0:
        problems.append("seconds_until_next exceeds its cap")
    TaskResultMeta.objects.filter(task_id=task_id).delete()
    return problems


def _claim_and_release() -> set[str]:
    """The ids a sender would claim now (claims given back at once)."""
    from django_celery_fulldbresult.scheduler import claims

    TaskResultMeta, _ = _models()
    token = uuid.uuid4()
    claimed = {r["task_id"] for r in claims.claim("default", token, 10_000)}
    TaskResultMeta.objects.filter(scheduled_id=token).update(scheduled_id=None, date_claimed=None)
    return claimed


def _tz_main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    try:
        problems = tz_checks()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        problems = [f"crashed: {exc!r}"]
    print(json.dumps(problems))


if __name__ == "__main__" and "--tz-child" in sys.argv:
    _tz_main()
