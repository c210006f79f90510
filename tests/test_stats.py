"""stats(), task_stats and the admin dashboard against rows a real worker wrote."""

from __future__ import annotations

import io
import json
import re
import statistics
import uuid
from datetime import timedelta

import pytest
from celery import states
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from django_celery_fulldbresult import SCHEDULED, stats
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .conftest import STACK, queue_name, requires_postgresql
from .test_publish_tracking import drain

pytestmark = pytest.mark.django_db(transaction=True)

NOBODY = queue_name("nobody-stats")  # no worker consumes it: its task stays PENDING
ADD, FAIL, FLAKY = (f"testproject.demo.tasks.{n}" for n in ("add", "fail", "flaky"))
SCHEDULED_ADD = "testproject.demo.tasks.scheduled_add"
HOSTILE = 'evil.<script>alert("x")</script>\\ "quoted"\nnext-line'
#: stats() statements once the window's past hours are sealed (``test_stats_rollups``): the
#: rollups of those hours, counts, run times, live workers, stale tasks, stale claims,
#: scheduled backlog.
STATS_STATEMENTS = 7


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


@pytest.fixture
def seeded(worker, settings, celery_app):
    """Through the real worker and broker: 4 successes, 2 failures, 1 success after a
    retry, 3 tasks held by the database scheduler, 1 published task nobody runs.

    Only what cannot happen within a test's lifetime is set by hand: the overdue
    scheduled row's eta (2 h ago), the unconsumed task's age (2 h) and a sender's claim
    that was never recorded (10 min old: that sender crashed).
    """
    for i in range(4):
        assert tasks.add.delay(i, i).get(timeout=30) == 2 * i
    for _ in range(2):
        failed = tasks.fail.delay()
        failed.get(timeout=30, propagate=False)
        assert failed.state == states.FAILURE
    flaky = tasks.flaky.delay(succeed_on=1)
    assert flaky.get(timeout=30) == "succeeded after 1 retries"
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True
    held = [tasks.scheduled_add.apply_async((i, i), countdown=3600) for i in range(3)]
    assert {row(r.id).status for r in held} == {SCHEDULED}
    pending = tasks.add.apply_async((1, 1), queue=NOBODY)
    drain(celery_app, NOBODY)
    now = timezone.now()
    TaskResultMeta.objects.filter(task_id=held[0].id).update(eta=now - timedelta(hours=2))
    TaskResultMeta.objects.filter(task_id=held[1].id).update(
        scheduled_id=uuid.uuid4(), date_claimed=now - timedelta(minutes=10)
    )
    TaskResultMeta.objects.filter(task_id=pending.id).update(date_modified=now - timedelta(hours=2))
    assert row(flaky.id).retries == 1
    return {"flaky": flaky.id, "overdue": held[0].id, "pending": pending.id}


def run_times(task: str | None = None) -> list[float]:
    rows = TaskResultMeta.objects.filter(status__in=[states.SUCCESS, states.FAILURE])
    if task:
        rows = rows.filter(task=task)
    return sorted((r.date_done - r.date_started).total_seconds() for r in rows)


def oracle(values: list[float]) -> dict[str, float]:
    """Percentiles by the standard library (linear interpolation, inclusive)."""
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def test_stats_match_the_seeded_tasks(seeded):
    TaskResultMeta.objects.stats()  # seals the window's past hours (nothing ran in them)
    with CaptureQueriesContext(connection) as queries:
        figures = TaskResultMeta.objects.stats()
    assert len(queries) == STATS_STATEMENTS, [q["sql"] for q in queries]
    assert json.loads(json.dumps(figures)) == figures  # plain JSON
    assert figures["states"] == {"FAILURE": 2, "PENDING": 1, "SCHEDULED": 3, "SUCCESS": 5}
    assert figures["total"] == 11
    assert figures["failure_rate"] == pytest.approx(2 / 7, abs=1e-6)
    assert figures["tasks"][ADD]["states"] == {"PENDING": 1, "SUCCESS": 4}
    assert figures["tasks"][ADD]["failure_rate"] == 0
    assert figures["tasks"][FAIL] == {
        "total": 2,
        "states": {"FAILURE": 2},
        "failure_rate": 1.0,
        "runtime": figures["tasks"][FAIL]["runtime"],
    }
    assert figures["tasks"][FLAKY]["states"] == {"SUCCESS": 1}
    assert figures["tasks"][SCHEDULED_ADD]["states"] == {"SCHEDULED": 3}
    assert figures["tasks"][SCHEDULED_ADD]["failure_rate"] is None
    assert list(figures["tasks"])[0] == ADD  # busiest first

    runtime = figures["runtime"]
    assert runtime["runs"] == 7 and runtime["exact"] is True
    assert runtime["method"] == ("percentile_cont" if STACK == "pg-rabbit" else "sample")
    for key, value in oracle(run_times()).items():
        assert runtime[key] == pytest.approx(value, abs=1e-5)
    for key, value in oracle(run_times(FAIL)).items():
        assert figures["tasks"][FAIL]["runtime"][key] == pytest.approx(value, abs=1e-5)
    assert figures["tasks"][FAIL]["runtime"]["runs"] == 2

    assert figures["stale"]["tasks"] == 2  # the unconsumed task and the overdue scheduled one
    assert figures["stale"]["scheduled_claims"] == 1
    scheduled = figures["scheduled"]
    assert (scheduled["backlog"], scheduled["due"]) == (3, 1)
    overdue = row(seeded["overdue"])
    assert scheduled["oldest_due_eta"] == overdue.eta.isoformat()
    # Database clock minus the eta: two hours and the few seconds this test took.
    assert 7200 <= scheduled["lateness_seconds"] < 7200 + 300


def test_the_window_bounds_the_counts(seeded):
    TaskResultMeta.objects.filter(status=states.FAILURE).update(
        date_done=timezone.now() - timedelta(hours=30)
    )
    figures = TaskResultMeta.objects.stats(timedelta(hours=24))
    assert "FAILURE" not in figures["states"] and FAIL not in figures["tasks"]
    assert figures["failure_rate"] == 0
    assert figures["runtime"]["runs"] == 5
    narrow = TaskResultMeta.objects.stats(timedelta(hours=1))
    assert "PENDING" not in narrow["states"]  # its last change is 2 h old
    assert TaskResultMeta.objects.stats(timedelta(days=2))["states"]["FAILURE"] == 2


def _runs_with_durations(seconds: list[int], task: str = "demo.timed") -> None:
    done = timezone.now() - timedelta(minutes=5)
    TaskResultMeta.objects.bulk_create(
        TaskResultMeta(
            task_id=str(uuid.uuid4()),
            task=task,
            status=states.SUCCESS,
            date_started=done - timedelta(seconds=s),
            date_done=done,
            date_modified=done,
        )
        for s in seconds
    )


def test_percentiles_interpolate_like_percentile_cont():
    """1..100 s: p50 50.5, p90 90.1, p99 99.01 (SQL on PostgreSQL, Python elsewhere)."""
    _runs_with_durations(list(range(100, 0, -1)))
    runtime = TaskResultMeta.objects.stats()["runtime"]
    assert (runtime["p50"], runtime["p90"], runtime["p99"]) == pytest.approx((50.5, 90.1, 99.01))


@pytest.mark.skipif(STACK == "pg-rabbit", reason="PostgreSQL computes exact percentiles")
def test_sampled_percentiles_say_so(monkeypatch):
    monkeypatch.setattr(stats, "RUNTIME_SAMPLE", 10)
    _runs_with_durations(list(range(1, 31)))
    runtime = TaskResultMeta.objects.stats()["runtime"]
    assert (runtime["runs"], runtime["exact"]) == (10, False)


def test_statement_count_does_not_grow_with_task_names():
    for index in range(40):
        _runs_with_durations([1, 2], task=f"demo.task{index}")
    TaskResultMeta.objects.stats()
    with CaptureQueriesContext(connection) as queries:
        figures = TaskResultMeta.objects.stats()
    assert len(figures["tasks"]) == 40
    assert len(queries) == STATS_STATEMENTS


def test_task_stats_json_text_and_prometheus(seeded):
    TaskResultMeta.objects.filter(task_id=seeded["flaky"]).update(task=HOSTILE)
    out = io.StringIO()
    call_command("task_stats", "--hours=24", "--format=json", stdout=out)
    figures = json.loads(out.getvalue())
    assert figures["window"]["seconds"] == 86400
    assert figures["states"]["SUCCESS"] == 5 and figures["tasks"][HOSTILE]["total"] == 1

    out = io.StringIO()
    call_command(
        "task_stats", "--minutes=90", "--stale-minutes=150", "--format=prometheus", stdout=out
    )
    text = out.getvalue()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    # The hostile name survives the exposition format's escaping unchanged.
    assert (
        samples[("celery_fulldbresult_tasks_total", (("state", "SUCCESS"), ("task", HOSTILE)))] == 1
    )
    assert samples[("celery_fulldbresult_tasks_total", (("state", "FAILURE"), ("task", FAIL)))] == 2
    assert samples[("celery_fulldbresult_window_seconds", ())] == 5400
    assert samples[("celery_fulldbresult_scheduled_tasks", ())] == 3
    assert samples[("celery_fulldbresult_scheduled_due_tasks", ())] == 1
    assert samples[("celery_fulldbresult_stale_tasks", ())] == 0  # both are 2 h old
    assert samples[("celery_fulldbresult_scheduled_lateness_seconds", ())] >= 7200
    assert samples[("celery_fulldbresult_failure_ratio", ())] == pytest.approx(2 / 7)
    assert ("celery_fulldbresult_runtime_seconds", (("quantile", "0.99"),)) in samples
    lines = text.splitlines()
    assert "# TYPE celery_fulldbresult_tasks_total gauge" in lines
    assert any(line.startswith("# HELP celery_fulldbresult_tasks_total ") for line in lines)
    escaped = HOSTILE.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    assert f'celery_fulldbresult_tasks_total{{state="SUCCESS",task="{escaped}"}} 1' in lines

    out = io.StringIO()
    call_command("task_stats", stdout=out)
    text = out.getvalue()
    assert text.startswith("Task results over the last 24 hours (since ")
    assert "failure rate 28.6%" in text
    assert "Scheduled: 3 waiting, 1 due now, oldest overdue by" in text
    assert any(line.split()[:2] == [FAIL, "2"] for line in text.splitlines())


# -- dashboard ---------------------------------------------------------------

DASHBOARD = "admin:django_celery_fulldbresult_taskresultmeta_dashboard"


def _user(name: str, staff: bool, superuser: bool = False, perms: tuple[str, ...] = ()) -> User:
    user = User.objects.create_user(name, password="pw", is_staff=staff, is_superuser=superuser)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def test_dashboard_shows_the_figures_and_the_chart(seeded, client):
    TaskResultMeta.objects.filter(task_id=seeded["flaky"]).update(task=HOSTILE)
    client.force_login(_user("boss", staff=True, superuser=True))
    client.get(reverse(DASHBOARD))  # seals the past hours
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse(DASHBOARD))
    assert response.status_code == 200
    html = response.content.decode()
    assert '<div class="fdr-value">11</div>' in html  # total
    assert "28.6 %" in html  # failure rate
    assert '<div class="fdr-value">3</div>' in html  # scheduled backlog
    assert "2 h 0 min" in html  # lateness of the overdue scheduled task
    assert html.count('class="fdr-bar"') == 24
    assert "succeeded (5)" in html and "failed (2)" in html  # the chart's totals
    bars = re.findall(r'data-succeeded="(\d+)" data-failed="(\d+)"', html)
    assert sum(int(ok) for ok, _ in bars) == 5 and sum(int(bad) for _, bad in bars) == 2
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    table = TaskResultMeta._meta.db_table
    task_queries = [q for q in queries if table in q["sql"]]
    # stats' statements but the rollups' and the live workers' (other tables), + the chart
    assert len(task_queries) == STATS_STATEMENTS - 2 + 1


def test_dashboard_permissions(client):
    url = reverse(DASHBOARD)
    client.force_login(_user("visitor", staff=False))
    response = client.get(url)
    assert response.status_code == 302 and "/login/" in response["Location"]
    client.force_login(_user("clerk", staff=True))
    assert client.get(url).status_code == 403
    client.force_login(_user("viewer", staff=True, perms=("view_taskresultmeta",)))
    assert client.get(url).status_code == 200
    client.logout()
    assert client.get(url).status_code == 302


def test_dashboard_window_is_bounded_for_view_only_users(client):
    """Each page view runs stats() over the window: a view-only user gets at most a day,
    an operator (any task action, or a superuser) up to a month."""
    url = reverse(DASHBOARD) + "?hours=744"
    client.force_login(_user("viewer", staff=True, perms=("view_taskresultmeta",)))
    page = client.get(url)
    assert page.context["hours"] == 24 and 'id="fdr-hours-limited"' in page.content.decode()
    assert client.get(reverse(DASHBOARD) + "?hours=6").context["hours"] == 6
    operator = _user("operator", True, perms=("view_taskresultmeta", "retry_taskresultmeta"))
    client.force_login(operator)
    page = client.get(url)
    assert page.context["hours"] == 744 and 'id="fdr-hours-limited"' not in page.content.decode()
    client.force_login(_user("root", staff=True, superuser=True))
    assert client.get(url).context["hours"] == 744


def test_dashboard_chart_buckets_by_hour():
    now = timezone.now()
    base = dict(task="demo.chart", date_modified=now)
    TaskResultMeta.objects.bulk_create(
        [
            TaskResultMeta(
                task_id=f"h3-{i}", status=states.SUCCESS, **base, date_done=now - timedelta(hours=3)
            )
            for i in range(4)
        ]
        + [
            TaskResultMeta(
                task_id="h3-fail", status=states.FAILURE, **base, date_done=now - timedelta(hours=3)
            ),
            TaskResultMeta(
                task_id="old", status=states.SUCCESS, **base, date_done=now - timedelta(hours=30)
            ),
            TaskResultMeta(task_id="retry", status=states.RETRY, **base),
        ]
    )
    buckets = stats.hourly(TaskResultMeta.objects.all(), 24, now=now)
    assert len(buckets) == 24
    hit = [b for b in buckets if b["SUCCESS"] or b["FAILURE"]]
    assert [(b["SUCCESS"], b["FAILURE"]) for b in hit] == [(4, 1)]
    assert buckets.index(hit[0]) == 20  # three hours before the current one
    start = hit[0]["hour"]
    assert start <= now - timedelta(hours=3) < start + timedelta(hours=1)


def test_stats_on_an_empty_table():
    figures = TaskResultMeta.objects.stats()
    assert figures["total"] == 0 and figures["failure_rate"] is None
    assert figures["runtime"]["p50"] is None and figures["scheduled"]["lateness_seconds"] is None


@requires_postgresql
def test_stats_statements_use_indexes_on_postgresql():
    """Old rows are never read: each statement starts from an index bounded by the window
    (the 1M-row timings are in bench/stats_bench.py)."""
    table = TaskResultMeta._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table}
              (task_id, task, status, replayable, retries, date_started, date_done, date_modified)
            SELECT 'old-' || g, 'demo.add', 'SUCCESS', true, 0,
                   now() - interval '3 days' - interval '1 second' * (g % 1000),
                   now() - interval '3 days', now() - interval '3 days'
            FROM generate_series(1, 200000) AS g
            """
        )
        cursor.execute(f"ANALYZE {table}")
    _runs_with_durations([1, 2, 3])
    TaskResultMeta.objects.stats()
    with CaptureQueriesContext(connection) as queries:
        TaskResultMeta.objects.stats()
    assert len(queries) == STATS_STATEMENTS
    for query in queries:
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN " + query["sql"])
            plan = "\n".join(r[0] for r in cursor.fetchall())
        assert f"Seq Scan on {table}" not in plan, plan
