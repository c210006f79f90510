"""purge_task_results: retention by age and state, batched, dry run, never unfinished rows."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from celery import states
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, SCHEDULED_SENT
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

pytestmark = pytest.mark.django_db(transaction=True)

PROTECTED = (
    states.PENDING,
    states.RECEIVED,
    states.STARTED,
    states.RETRY,
    SCHEDULED,
    SCHEDULED_SENT,
    "PROGRESS",
)


def _make(status: str, age: timedelta) -> str:
    when = timezone.now() - age
    task_id = str(uuid.uuid4())
    TaskResultMeta.objects.create(
        task_id=task_id,
        task="demo.purge",
        status=status,
        date_modified=when,
        date_done=when if status in (states.SUCCESS, states.FAILURE, states.REVOKED) else None,
        eta=when if status == SCHEDULED else None,
    )
    return task_id


@pytest.fixture
def table(worker):
    """Ten results written by the real worker, aged 40 days (7 SUCCESS, 3 FAILURE), two
    fresh ones, and a 40-day-old row in every unfinished state."""
    old = [tasks.add.delay(i, 1) for i in range(7)] + [tasks.fail.delay() for _ in range(3)]
    for result in old:
        result.get(timeout=30, propagate=False)
    fresh = [tasks.add.delay(9, 9), tasks.fail.delay()]
    for result in fresh:
        result.get(timeout=30, propagate=False)
    ago = timezone.now() - timedelta(days=40)
    TaskResultMeta.objects.filter(task_id__in=[r.id for r in old]).update(
        date_done=ago, date_modified=ago
    )
    protected = {status: _make(status, timedelta(days=40)) for status in PROTECTED}
    return {"old": {r.id for r in old}, "fresh": {r.id for r in fresh}, "protected": protected}


def ids() -> set[str]:
    return set(TaskResultMeta.objects.values_list("task_id", flat=True))


def purge(*args: str) -> tuple[str, str, list[dict]]:
    out, err = io.StringIO(), io.StringIO()
    with CaptureQueriesContext(connection) as queries:
        call_command("purge_task_results", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue(), queries.captured_queries


def test_dry_run_counts_and_deletes_nothing(table):
    before = ids()
    out, err, queries = purge("--days=30", "--dry-run")
    assert "Would delete 10 task results" in out and "FAILURE 3, SUCCESS 7" in out
    assert ids() == before and err == ""
    assert not [q for q in queries if q["sql"].startswith("DELETE")]


def test_purges_old_final_rows_in_batches_and_keeps_everything_else(table):
    out, err, queries = purge("--days=30", "--batch-size=3")
    assert "Deleted 10 task results" in out
    remaining = ids()
    assert not remaining & table["old"]
    assert remaining == table["fresh"] | set(table["protected"].values())
    deletes = [q for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 4  # 3 + 3 + 3 + 1
    assert err.splitlines() == [
        "deleted 3 of 10 (30%)",
        "deleted 6 of 10 (60%)",
        "deleted 9 of 10 (90%)",
        "deleted 10 of 10 (100%)",
    ]


def test_batch_size_comes_from_the_cleanup_setting(table, settings):
    settings.DJANGO_CELERY_FULLDBRESULT_CLEANUP_BATCH_SIZE = 4
    _, err, queries = purge("--days=30")
    assert len([q for q in queries if q["sql"].startswith("DELETE")]) == 3  # 4 + 4 + 2
    assert len(err.splitlines()) == 3


def test_state_and_age_select_what_goes(table):
    out, _, _ = purge("--days=30", "--state=FAILURE")
    assert "Deleted 3 task results" in out
    left = TaskResultMeta.objects.filter(task_id__in=table["old"])
    assert set(left.values_list("status", flat=True)) == {states.SUCCESS}
    out, _, _ = purge("--days=50")
    assert "Deleted 0 task results" in out
    assert TaskResultMeta.objects.filter(task_id__in=table["old"]).count() == 7


def test_unfinished_states_need_to_be_asked_for(table):
    for state in (states.PENDING, SCHEDULED, states.STARTED, states.RETRY, SCHEDULED_SENT):
        with pytest.raises(CommandError, match="--include-unfinished"):
            purge("--days=30", f"--state={state}")
    out, _, _ = purge("--days=30", "--state=SCHEDULED", "--state=PROGRESS", "--include-unfinished")
    assert "Deleted 2 task results" in out
    remaining = ids()
    assert table["protected"][SCHEDULED] not in remaining
    assert table["protected"]["PROGRESS"] not in remaining
    assert table["protected"][states.PENDING] in remaining
    # Every state at once: only the fresh rows stay.
    purge("--days=30", "--include-unfinished")
    assert ids() == table["fresh"]


def test_unknown_states_and_missing_age_are_errors(db):
    with pytest.raises(CommandError, match="unknown state 'SUCCES'"):
        purge("--days=1", "--state=SUCCES")
    with pytest.raises(CommandError, match="give an age"):
        purge("--state=SUCCESS")
