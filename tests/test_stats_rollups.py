"""stats() and the chart read the hours that are over from their rollups (``rollups``).

The rows are written by a real worker through the broker, then moved back in time as a
whole (start and end together, so run times are kept): the only thing a test cannot wait
for is hours passing.
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from celery import states
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_celery_fulldbresult import rollups, stats
from django_celery_fulldbresult.models import (
    StatsHour,
    StatsHourCount,
    StatsHourRunTimes,
    TaskResultMeta,
)
from testproject.demo import tasks

from .conftest import STACK, a_worker_commits_after_reads
from .test_stats import ADD, FAIL, STATS_STATEMENTS, _user

pytestmark = pytest.mark.django_db(transaction=True)

HOUR = timedelta(hours=1)


def moved_back(ids: list[str], delta: timedelta) -> None:
    TaskResultMeta.objects.filter(task_id__in=ids).update(
        date_started=F("date_started") - delta,
        date_done=F("date_done") - delta,
        date_modified=F("date_modified") - delta,
    )


@pytest.fixture
def history(worker):
    """5 successes 3 hours ago and 2 failures 5 hours ago, run by the worker; 1 success now."""
    succeeded = [tasks.add.delay(i, i) for i in range(5)]
    failed = [tasks.fail.delay() for _ in range(2)]
    for result in succeeded + failed:
        result.get(timeout=30, propagate=False)
    moved_back([r.id for r in succeeded], 3 * HOUR)
    moved_back([r.id for r in failed], 5 * HOUR)
    assert tasks.add.delay(9, 9).get(timeout=30) == 18
    return {"succeeded": [r.id for r in succeeded], "failed": [r.id for r in failed]}


def run_seconds() -> list[float]:
    rows = TaskResultMeta.objects.filter(status__in=[states.SUCCESS, states.FAILURE])
    return sorted((r.date_done - r.date_started).total_seconds() for r in rows)


def test_sealed_hours_give_the_counts_of_the_rows(history):
    exact = TaskResultMeta.objects.stats(exact=True)
    figures = TaskResultMeta.objects.stats()
    sealed = {h.hour for h in StatsHour.objects.all()}
    now = timezone.now()
    assert len(sealed) in (22, 23)  # the whole hours after the window's start, ended 5 min ago
    assert max(sealed) == rollups.hour_of(now - rollups.SEAL_AFTER) - HOUR
    counted = {(c.task, c.status): c.count for c in StatsHourCount.objects.all()}
    assert counted == {(ADD, states.SUCCESS): 5, (FAIL, states.FAILURE): 2}

    for key in ("total", "states", "failure_rate"):
        assert figures[key] == exact[key], key
    assert figures["states"] == {"SUCCESS": 6, "FAILURE": 2}
    assert figures["tasks"][ADD]["states"] == {"SUCCESS": 6}
    assert figures["tasks"][FAIL]["states"] == {"FAILURE": 2}

    runtime = figures["runtime"]
    assert (runtime["method"], runtime["exact"], runtime["runs"]) == ("histogram", False, 8)
    seconds, error = run_seconds(), rollups.RELATIVE_ERROR
    for fraction in stats.PERCENTILES:
        # the bin of one of the two ranks percentile_cont interpolates between
        position = fraction * (len(seconds) - 1)
        low, high = seconds[int(position)], seconds[min(int(position) + 1, len(seconds) - 1)]
        assert low * (1 - error) - 1e-6 <= runtime[stats._key(fraction)] <= high * (1 + error)
    assert figures["tasks"][FAIL]["runtime"]["runs"] == 2
    assert exact["runtime"]["exact"] is True and exact["runtime"]["runs"] == 8


def test_a_sealed_hour_is_read_from_its_rollup(history):
    """Once sealed, an hour's rows are not read again: a row deleted from it still counts
    (the rollup is the record of what finished then), and the statements are those of
    stats() with the rollups' read."""
    TaskResultMeta.objects.stats()
    TaskResultMeta.objects.filter(task_id=history["failed"][0]).delete()
    with CaptureQueriesContext(connection) as queries:
        figures = TaskResultMeta.objects.stats()
    assert len(queries) == STATS_STATEMENTS, [q["sql"] for q in queries]
    assert figures["states"][states.FAILURE] == 2
    assert TaskResultMeta.objects.stats(exact=True)["states"][states.FAILURE] == 1
    # A filtered queryset is not what the rollups count: it reads its rows.
    assert TaskResultMeta.objects.filter(task=FAIL).stats()["states"] == {"FAILURE": 1}


def test_an_hour_is_sealed_only_once_its_late_results_are_in(worker):
    """A result stored shortly after its hour ended (its date_done is in that hour) is
    counted: the hour is sealed SEAL_AFTER after its end, not before."""
    result = tasks.add.delay(1, 2)
    assert result.get(timeout=30) == 3
    row = TaskResultMeta.objects.get(task_id=result.id)
    hour = rollups.hour_of(row.date_done) - HOUR
    moved_back([result.id], row.date_done - (hour + HOUR - timedelta(seconds=1)))
    early = hour + HOUR + rollups.SEAL_AFTER - timedelta(seconds=30)
    assert StatsHour.objects.filter(hour=hour).count() == 0
    TaskResultMeta.objects.stats(now=early)
    assert not StatsHour.objects.filter(hour=hour).exists()

    late = tasks.add.delay(2, 3)  # stored late, into the same hour
    assert late.get(timeout=30) == 5
    late_row = TaskResultMeta.objects.get(task_id=late.id)
    moved_back([late.id], late_row.date_done - (hour + HOUR - timedelta(milliseconds=10)))
    sealed_at = hour + HOUR + rollups.SEAL_AFTER + timedelta(seconds=30)
    figures = TaskResultMeta.objects.stats(now=sealed_at)
    assert StatsHour.objects.filter(hour=hour).exists()
    assert StatsHourCount.objects.get(hour=hour).count == 2
    assert figures["states"] == {"SUCCESS": 2}


def test_the_chart_reads_sealed_hours_from_rollups(history):
    now = timezone.now()
    exact = stats.hourly(TaskResultMeta.objects.filter(pk__gt=0), 24, now=now)  # the rows
    assert sum(b["SUCCESS"] for b in exact) == 6 and sum(b["FAILURE"] for b in exact) == 2
    assert stats.hourly(TaskResultMeta.objects.all(), 24, now=now) == exact
    assert StatsHour.objects.count() in (22, 23, 24)
    TaskResultMeta.objects.filter(task_id__in=history["succeeded"]).delete()
    assert stats.hourly(TaskResultMeta.objects.all(), 24, now=now) == exact


def test_percentiles_from_sealed_hours_are_within_the_stated_error():
    """1.25..100.25 s done 3 hours ago: each percentile within RELATIVE_ERROR of the run time
    at its rank."""
    done = timezone.now() - 3 * HOUR
    TaskResultMeta.objects.bulk_create(
        TaskResultMeta(
            task_id=str(uuid.uuid4()),
            task="demo.timed",
            status=states.SUCCESS,
            date_started=done - timedelta(seconds=s + 0.25),
            date_done=done,
            date_modified=done,
        )
        for s in range(1, 101)
    )
    runtime = TaskResultMeta.objects.stats()["runtime"]
    assert runtime["method"] == "histogram" and runtime["runs"] == 100
    for key, rank_value in (("p50", 50.25), ("p90", 90.25), ("p99", 99.25)):
        assert runtime[key] == pytest.approx(rank_value, rel=rollups.RELATIVE_ERROR + 1e-6)
    # The database put each run in the bin Python does.
    stored = Counter({r.bin: r.runs for r in StatsHourRunTimes.objects.filter(task="demo.timed")})
    assert stored == Counter(rollups.bin_of(s + 0.25) for s in range(1, 101))


def test_a_database_that_refuses_the_rollups_gets_the_rows_figures(history):
    """Sealing needs to write: where it cannot (here a trigger refuses the insert), stats()
    reads every row instead, and says so by its exact figures."""
    table = StatsHour._meta.db_table
    with connection.cursor() as cursor:
        if STACK == "pg-rabbit":
            cursor.execute(
                "CREATE FUNCTION fdr_refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'read only'; END $$"
            )
            cursor.execute(
                f'CREATE TRIGGER fdr_refuse BEFORE INSERT ON "{table}"'
                " FOR EACH ROW EXECUTE FUNCTION fdr_refuse()"
            )
        elif STACK == "maria-redis":
            cursor.execute(
                f"CREATE TRIGGER fdr_refuse BEFORE INSERT ON `{table}` FOR EACH ROW"
                " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'read only'"
            )
        else:
            cursor.execute(
                f'CREATE TRIGGER fdr_refuse BEFORE INSERT ON "{table}"'
                " BEGIN SELECT RAISE(ABORT, 'read only'); END"
            )
    try:
        with transaction.atomic():  # as in a view under ATOMIC_REQUESTS
            figures = TaskResultMeta.objects.stats()
            assert TaskResultMeta.objects.count() == 8  # the caller's transaction still works
        assert figures["states"] == {"SUCCESS": 6, "FAILURE": 2}
        assert figures["runtime"]["exact"] is True
        assert not StatsHour.objects.exists()
    finally:
        with connection.cursor() as cursor:
            if STACK == "pg-rabbit":
                cursor.execute(f'DROP TRIGGER fdr_refuse ON "{table}"')
                cursor.execute("DROP FUNCTION fdr_refuse()")
            else:
                cursor.execute("DROP TRIGGER fdr_refuse")


def test_task_stats_exact_and_the_dashboard_say_how_run_times_were_found(history, client):
    out = io.StringIO()
    call_command("task_stats", "--format=json", stdout=out)
    assert json.loads(out.getvalue())["runtime"]["method"] == "histogram"
    out = io.StringIO()
    call_command("task_stats", "--exact", stdout=out)
    assert "8 runs, exact)" in out.getvalue()
    out = io.StringIO()
    call_command("task_stats", stdout=out)
    assert "8 runs, each within 4.4%)" in out.getvalue()

    client.force_login(_user("boss", staff=True, superuser=True))
    html = client.get(reverse("admin:django_celery_fulldbresult_taskresultmeta_dashboard"))
    assert "8 runs (each within 4.4 %)" in html.content.decode()
    assert "failed (2)" in html.content.decode()


def test_old_rollups_are_dropped_when_an_hour_is_sealed():
    now = timezone.now()
    ancient = rollups.hour_of(now - rollups.KEEP - 2 * HOUR)
    StatsHour.objects.create(hour=ancient)
    StatsHourCount.objects.create(hour_id=ancient, task="x", status="SUCCESS", count=1)
    StatsHourRunTimes.objects.create(hour_id=ancient, task="x", bin=3, runs=1)
    TaskResultMeta.objects.stats(now=now)
    assert not StatsHour.objects.filter(hour=ancient).exists()
    assert not StatsHourCount.objects.filter(hour_id=ancient).exists()
    assert not StatsHourRunTimes.objects.filter(hour_id=ancient).exists()


def test_rollups_without_time_zones(settings):
    """``USE_TZ = False``: naive hours on the naive clock, the same figures as the rows'."""
    settings.USE_TZ = False
    now = timezone.now()
    assert timezone.is_naive(now)
    TaskResultMeta.objects.bulk_create(
        TaskResultMeta(
            task_id=str(uuid.uuid4()),
            task="demo.naive",
            status=states.SUCCESS if i % 4 else states.FAILURE,
            date_started=now - 3 * HOUR - timedelta(seconds=i + 1),
            date_done=now - 3 * HOUR,
            date_modified=now - 3 * HOUR,
        )
        for i in range(8)
    )
    figures = TaskResultMeta.objects.stats()
    assert figures["states"] == {"SUCCESS": 6, "FAILURE": 2}
    assert figures["runtime"]["method"] == "histogram" and figures["runtime"]["runs"] == 8
    sealed = StatsHour.objects.get(counts__task="demo.naive", counts__status="SUCCESS")
    assert timezone.is_naive(sealed.hour) and sealed.hour == rollups.hour_of(now - 3 * HOUR)
    chart = stats.hourly(TaskResultMeta.objects.all(), 24)
    assert [(b["SUCCESS"], b["FAILURE"]) for b in chart if b["SUCCESS"]] == [(6, 2)]


def test_hours_are_sealed_while_a_worker_commits(history, caplog):
    """A worker storing a result while stats() seals does not keep the hours from being
    sealed (on SQLite the sealing transaction takes the write lock before it reads: a
    deferred one that read first was refused at once, and stats() read the rows again)."""
    with a_worker_commits_after_reads("default", StatsHour._meta.db_table) as stored:
        figures = TaskResultMeta.objects.stats()
    assert stored, "no worker committed during the stats() read"
    assert "could not seal" not in caplog.text
    assert figures["states"] == {"SUCCESS": 6 + len(stored), "FAILURE": 2}
    counted = {(c.task, c.status): c.count for c in StatsHourCount.objects.all()}
    assert counted == {(ADD, states.SUCCESS): 5, (FAIL, states.FAILURE): 2}


#: This session refuses writes, and takes them again (a read-only replica), per vendor.
READ_ONLY = {
    "postgresql": ("SET default_transaction_read_only = on", "RESET default_transaction_read_only"),
    "mysql": ("SET SESSION TRANSACTION READ ONLY", "SET SESSION TRANSACTION READ WRITE"),
    "sqlite": ("PRAGMA query_only = ON", "PRAGMA query_only = OFF"),
}


@pytest.mark.parametrize("in_atomic", [False, True], ids=["autocommit", "in_atomic"])
def test_a_database_that_refuses_writes_is_read_row_by_row(history, caplog, in_atomic):
    """stats() on a database that refuses the sealing (a read-only replica): the figures come
    from the rows, nothing is sealed, and the warning names the database's error. Inside the
    caller's atomic() the refused sealing is rolled back alone: the caller's transaction
    goes on."""
    refuse, accept = READ_ONLY[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(refuse)
    try:
        if in_atomic:
            with transaction.atomic():
                figures = TaskResultMeta.objects.stats()
                assert TaskResultMeta.objects.filter(status=states.FAILURE).count() == 2
        else:
            figures = TaskResultMeta.objects.stats()
    finally:
        with connection.cursor() as cursor:
            cursor.execute(accept)
    assert figures["states"] == {"SUCCESS": 6, "FAILURE": 2}
    assert not StatsHour.objects.exists()
    assert re.search(
        r"stats: could not seal \d+ hours \(\w+Error: .+\); reading the rows", caplog.text
    ), caplog.text
    TaskResultMeta.objects.stats()  # writable again: the next read seals
    assert StatsHour.objects.exists()


def test_two_readers_sealing_at_once_agree(history):
    """Two processes' first stats() at once: both seal the same hours; the second's inserts
    are skipped, neither fails, and each hour is counted once."""
    barrier = threading.Barrier(2)
    results: list = []

    def first_read() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(TaskResultMeta.objects.stats()["states"])
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=first_read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [{"SUCCESS": 6, "FAILURE": 2}] * 2
    counted = sorted((c.hour_id, c.task, c.status) for c in StatsHourCount.objects.all())
    assert len(counted) == len(set(counted)) == 2
    assert TaskResultMeta.objects.stats()["states"] == {"SUCCESS": 6, "FAILURE": 2}
