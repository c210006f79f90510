"""Figures an operator can use: counts, failure rate, run times, stale rows, scheduled backlog.

``TaskResultMeta.objects.stats(window)`` returns a plain, JSON-serialisable dict
(shape in ``docs/design.md``, "Statistics"). It runs a fixed number of statements
whatever the table size and the number of task names: seven once the window's past hours
are sealed (``rollups``; the first call that reads an hour counts it).

* the sealed hours (whole hours ended ``rollups.SEAL_AFTER`` ago): their counts per task
  and state, and their run-time histograms summed per task and bin, from the rollups;
* the rest of the window from the task table: final rows done outside the sealed hours and
  unfinished rows changed in the window, counts and run-time bins in one ``GROUP BY``;
* run times (``date_done - date_started`` of SUCCESS and FAILURE rows done in the
  window): merged histograms (within ``rollups.RELATIVE_ERROR``) when the sealed hours hold
  runs; else, and with ``exact=True``, ``percentile_cont`` in SQL on PostgreSQL (per task
  and overall) or the ``RUNTIME_SAMPLE`` most recent runs read in one query and
  interpolated the same way in Python;
* stale counts: ``get_stale_tasks(...).count()`` (the live workers read first) and
  ``get_stale_scheduled_tasks(...).count()``;
* scheduled backlog: one conditional aggregate over SCHEDULED rows, lateness on the
  database clock.

``exact=True`` (or a filtered queryset) reads every row of the window instead of the
rollups: six statements. ``hourly(...)`` is the dashboard's chart: completions and failures
per hour, from the rollups and one ``GROUP BY`` on ``TruncHour(date_done)`` (UTC buckets,
portable) for the later hours.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from django.db import connections
from django.db.models import (
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Max,
    Min,
    Q,
    QuerySet,
)
from django.db.models.functions import TruncHour
from django.utils import timezone

from . import db, rollups
from .db import DatabaseNow
from .states import FAILURE, FINAL_STATES, SCHEDULED, SUCCESS

#: Run-time percentiles reported, as fractions (keys "p50", "p90", "p99").
PERCENTILES = (0.5, 0.9, 0.99)
#: Runs read into Python where the database has no percentile function (MySQL, SQLite).
RUNTIME_SAMPLE = 10_000
#: Defaults of ``stats()``.
DEFAULT_WINDOW = dt.timedelta(hours=24)
DEFAULT_STALE_AFTER = dt.timedelta(hours=1)
DEFAULT_CLAIM_STALE_AFTER = dt.timedelta(minutes=5)

_FINALS = sorted(FINAL_STATES)  # same order as the partial index condition
_RUN_STATES = (SUCCESS, FAILURE)


def _key(fraction: float) -> str:
    return f"p{fraction * 100:g}"


def _seconds(value: dt.timedelta | None) -> float | None:
    return None if value is None else round(value.total_seconds(), 6)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def unfinished_since(since: dt.datetime) -> Q:
    """Unfinished rows whose last state change is at or after ``since``."""
    return ~Q(status__in=_FINALS) & Q(date_modified__gte=since)


def in_window(since: dt.datetime) -> Q:
    """Rows whose last state change is at or after ``since`` (each branch has an index)."""
    return Q(status__in=_FINALS, date_done__gte=since) | unfinished_since(since)


def interpolate(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks: what ``percentile_cont`` computes."""
    if not sorted_values:
        return None
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    value = sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
    return round(value, 6)


def failure_rate(states: dict[str, int]) -> float | None:
    """FAILURE / (SUCCESS + FAILURE); None when nothing finished either way."""
    done = states.get(SUCCESS, 0) + states.get(FAILURE, 0)
    return round(states.get(FAILURE, 0) / done, 6) if done else None


def _counts(queryset: QuerySet, rows: Q) -> dict[str, dict[str, int]]:
    rows = queryset.filter(rows).order_by().values_list("task", "status").annotate(n=Count("pk"))
    per_task: dict[str, dict[str, int]] = {}
    for task, status, n in rows:
        per_task.setdefault(task, {})[status] = n
    return per_task


def _runs(queryset: QuerySet, since: dt.datetime) -> QuerySet:
    return queryset.filter(
        status__in=_RUN_STATES, date_done__gte=since, date_started__isnull=False
    ).order_by()


def _runtime_sql(queryset: QuerySet, since: dt.datetime) -> tuple[dict, dict]:
    """PostgreSQL: exact percentiles in SQL, per task and overall in one statement.

    ``GROUP BY ROLLUP(task)`` gives each task's row and the overall row from one scan;
    the array form of ``percentile_cont`` sorts each group's run times once.
    """
    runs = _runs(queryset, since)
    connection = connections[runs.db]
    where, params = db.compiled_where(runs)
    quote = connection.ops.quote_name
    task, done, started = quote("task"), quote("date_done"), quote("date_started")
    fractions = ", ".join(repr(float(f)) for f in PERCENTILES)
    sql = (
        f"SELECT {task}, GROUPING({task}), COUNT(*), percentile_cont(ARRAY[{fractions}])"
        f" WITHIN GROUP (ORDER BY {done} - {started})"
        f" FROM {quote(runs.model._meta.db_table)} WHERE {where} GROUP BY ROLLUP({task})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    overall: dict[str, Any] = {"runs": 0, **{_key(f): None for f in PERCENTILES}}
    per_task = {}
    for name, is_total, count, values in rows:
        figures = {"runs": count}
        figures.update(
            {_key(f): _seconds(v) for f, v in zip(PERCENTILES, values or (), strict=False)}
        )
        if is_total:
            overall = {**overall, **figures}
        else:
            per_task[name] = figures
    return {"method": "percentile_cont", "exact": True, **overall}, per_task


def _summary(durations: list[float]) -> dict[str, Any]:
    durations.sort()
    return {"runs": len(durations), **{_key(f): interpolate(durations, f) for f in PERCENTILES}}


def _runtime_sample(queryset: QuerySet, since: dt.datetime) -> tuple[dict, dict]:
    """Other databases: the most recent RUNTIME_SAMPLE runs (one indexed query)."""
    rows = list(
        _runs(queryset, since)
        .order_by("-date_done")
        .values_list("task", "date_started", "date_done")[:RUNTIME_SAMPLE]
    )
    by_task: dict[str, list[float]] = {}
    everything: list[float] = []
    for task, started, done in rows:
        seconds = (done - started).total_seconds()
        by_task.setdefault(task, []).append(seconds)
        everything.append(seconds)
    overall = {"method": "sample", "exact": len(rows) < RUNTIME_SAMPLE, **_summary(everything)}
    return overall, {task: _summary(values) for task, values in by_task.items()}


def _scheduled(queryset: QuerySet) -> dict[str, Any]:
    due = Q(eta__lte=DatabaseNow())
    lateness = ExpressionWrapper(DatabaseNow() - F("eta"), output_field=DurationField())
    # Only eta and status are read: an index-only scan (fdr_scheduled_eta_idx).
    figures = queryset.filter(status=SCHEDULED).aggregate(
        backlog=Count("*"),
        due=Count("eta", filter=due),
        oldest_due_eta=Min("eta", filter=due),
        lateness=Max(lateness, filter=due),
    )
    return {
        "backlog": figures["backlog"],
        "due": figures["due"],
        "oldest_due_eta": _iso(figures["oldest_due_eta"]),
        "lateness_seconds": _seconds(figures["lateness"]),
    }


def _exact_runtime(queryset: QuerySet, since: dt.datetime) -> tuple[dict, dict]:
    if _vendor(queryset) == "postgresql":
        return _runtime_sql(queryset, since)
    return _runtime_sample(queryset, since)


def _histogram_runtime(
    sealed: dict[str, Counter[int]], live: dict[str, Counter[int]]
) -> tuple[dict, dict]:
    """Run times merged from the sealed hours' histograms and the rest's (approximate)."""
    everything: Counter[int] = Counter()
    per_task = {}
    for task in sealed.keys() | live.keys():
        histogram = sealed.get(task, Counter()) + live.get(task, Counter())
        everything.update(histogram)
        per_task[task] = _histogram_summary(histogram)
    overall = {
        "method": "histogram",
        "exact": False,
        "relative_error": rollups.RELATIVE_ERROR,
        **_histogram_summary(everything),
    }
    return overall, per_task


def _histogram_summary(histogram: Counter[int]) -> dict[str, Any]:
    return {
        "runs": sum(histogram.values()),
        **{_key(f): rollups.percentile(histogram, f) for f in PERCENTILES},
    }


def _window_figures(
    queryset: QuerySet, since: dt.datetime, now: dt.datetime, exact: bool
) -> tuple[dict[str, dict[str, int]], dict, dict]:
    """Counts per task and state, and run times, over the window: from the rows, or from
    the sealed hours' rollups and the rows of the rest of the window."""
    span = None if exact or not rollups.applies(queryset) else rollups.sealable(since, now)
    sealed = rollups.read(queryset, span, now) if span else None
    if sealed is None:
        return (_counts(queryset, in_window(since)), *_exact_runtime(queryset, since))
    rest = span.outside(since) | unfinished_since(since)
    if sealed.has_runs():
        counts, live_run_times = rollups.live_figures(queryset, rest)
        runtime, task_runtime = _histogram_runtime(sealed.run_times, live_run_times)
    else:  # nothing ran in the sealed hours: exact run times cost no more
        counts = _counts(queryset, rest)
        runtime, task_runtime = _exact_runtime(queryset, since)
    for task, per_state in sealed.counts.items():
        mine = counts.setdefault(task, {})
        for status, n in per_state.items():
            mine[status] = mine.get(status, 0) + n
    return counts, runtime, task_runtime


def collect(
    queryset: QuerySet,
    window: dt.timedelta = DEFAULT_WINDOW,
    *,
    stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
    claim_stale_after: dt.timedelta = DEFAULT_CLAIM_STALE_AFTER,
    now: dt.datetime | None = None,
    exact: bool = False,
) -> dict[str, Any]:
    """The figures of ``queryset`` (usually every task row) over the last ``window``.

    ``exact``: read every row of the window, not the rollups of its sealed hours (exact
    run-time percentiles; counts that include rows written or deleted after their hour was
    sealed).
    """
    now = now or timezone.now()
    since = now - window
    counts, runtime, task_runtime = _window_figures(queryset, since, now, exact)
    states: dict[str, int] = {}
    tasks: dict[str, Any] = {}
    for task, per_state in sorted(counts.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])):
        for status, n in per_state.items():
            states[status] = states.get(status, 0) + n
        tasks[task] = {
            "total": sum(per_state.values()),
            "states": dict(sorted(per_state.items())),
            "failure_rate": failure_rate(per_state),
            "runtime": task_runtime.get(task),
        }
    return {
        "generated_at": now.isoformat(),
        "window": {
            "start": since.isoformat(),
            "end": now.isoformat(),
            "seconds": window.total_seconds(),
        },
        "total": sum(states.values()),
        "states": dict(sorted(states.items())),
        "failure_rate": failure_rate(states),
        "runtime": runtime,
        "tasks": tasks,
        "stale": {
            "tasks": queryset.get_stale_tasks(stale_after, now=now).count(),
            "after_seconds": stale_after.total_seconds(),
            "scheduled_claims": queryset.get_stale_scheduled_tasks(
                claim_stale_after, now=now
            ).count(),
            "claim_after_seconds": claim_stale_after.total_seconds(),
        },
        "scheduled": _scheduled(queryset),
    }


def _vendor(queryset: QuerySet) -> str:
    return connections[queryset.db].vendor


def hourly(
    queryset: QuerySet, hours: int = 24, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Completions and failures per hour, oldest first: the current hour and ``hours - 1`` before.

    Each item: ``{"hour": <datetime, start of the hour>, "SUCCESS": n, "FAILURE": n}``.
    Sealed hours come from their rollups (``rollups``), the others from one ``GROUP BY`` on
    ``TruncHour(date_done)`` (UTC buckets, portable); hours without a completion are filled
    in with zeros.
    """
    now = now or timezone.now()
    current = rollups.hour_of(now)
    first = current - dt.timedelta(hours=hours - 1)
    found: dict[tuple[dt.datetime, str], int] = {}
    span = rollups.sealable(first, now) if rollups.applies(queryset) else None
    sealed = rollups.read(queryset, span, now, run_times=False) if span else None
    rows = queryset.filter(status__in=_RUN_STATES, date_done__gte=first)
    if sealed is not None:
        for hour, per_state in sealed.hours.items():
            for status in _RUN_STATES:
                found[(hour, status)] = per_state.get(status, 0)
        rows = rows.filter(date_done__gte=span.end)
    counted = (
        rows.order_by()
        .annotate(hour=TruncHour("date_done", tzinfo=rollups.utc_of(now)))
        .values_list("hour", "status")
        .annotate(n=Count("pk"))
    )
    for hour, status, n in counted:
        found[(hour, status)] = n
    buckets = []
    for index in range(hours):
        hour = first + dt.timedelta(hours=index)
        buckets.append(
            {
                "hour": hour,
                SUCCESS: found.get((hour, SUCCESS), 0),
                FAILURE: found.get((hour, FAILURE), 0),
            }
        )
    return buckets
