"""Hourly rollups of finished rows: what ``stats()`` and the dashboard's chart read for the
hours that are over, instead of the rows themselves.

A final row (SUCCESS, FAILURE, REVOKED) does not change once done, so an hour whose rows
are all written can be counted once and the counts kept: a ``StatsHour`` row says the hour
is counted ("sealed") and its ``StatsHourCount`` rows hold, per task name and final state,
the rows done in it, and its ``StatsHourRunTimes`` rows a histogram of their run times
(runs per task name and bin). An hour is sealed the first time a
``stats()`` or chart reads it after ``SEAL_AFTER`` has passed since its end (a result stored
late, by a worker that lost its database for a while, still falls in its hour). Nothing is
added to the write path: the rows are counted by the reader, once per hour.

``stats(window)`` then reads the sealed hours of the window from these rows and only the
rest from the task table: the part of the window's first hour after its start, the hours
not yet sealed (at most one and ``SEAL_AFTER``), and the unfinished rows (they change).

Run-time percentiles merged from histograms are approximate: a run time falls in a bin
``2 ** (b / BINS_PER_OCTAVE)`` to ``2 ** ((b + 1) / BINS_PER_OCTAVE)`` seconds wide and is
reported as the bin's geometric middle, within ``RELATIVE_ERROR`` (4.4 %) of the exact value.
``stats(exact=True)`` reads every row instead.

What a rollup does not see: a row written into an hour already sealed (an import of old
results forgets the rollups: ``forget``; a store more than ``SEAL_AFTER`` late), and a row
deleted or re-run after its hour was sealed (the hour keeps counting it: the rollup is the
record of what finished then, which retention does not erase).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError
from django.db.models import (
    Case,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Func,
    IntegerField,
    Q,
    QuerySet,
    Sum,
    When,
)
from django.db.models.functions import TruncHour
from django.utils import timezone

from . import db
from .models import StatsHour, StatsHourCount, StatsHourRunTimes
from .states import FAILURE, FINAL_STATES, SUCCESS

logger = logging.getLogger(__name__)

#: An hour is sealed once this long has passed since its end.
SEAL_AFTER = dt.timedelta(minutes=5)
#: Sealed hours are kept this long (the dashboard's widest window is 31 days); a wider
#: window is read from the task table.
KEEP = dt.timedelta(days=35)
#: Histogram resolution: bins per doubling of the run time.
BINS_PER_OCTAVE = 8
#: The largest relative difference between a run time and its bin's middle.
RELATIVE_ERROR = round(2 ** (1 / (2 * BINS_PER_OCTAVE)) - 1, 4)
#: Run times shorter than this (or negative: clocks) go to its bin.
SHORTEST = 1e-6

FINALS = sorted(FINAL_STATES)
RUN_STATES = (SUCCESS, FAILURE)

#: The run time in seconds, per database, from ``date_done - date_started`` as Django
#: compiles it (``{duration}``: an interval on PostgreSQL, microseconds elsewhere).
SECONDS_SQL = {
    "postgresql": "EXTRACT(EPOCH FROM {duration})::float8",
    "mysql": "({duration}) / 1000000.0",
    "sqlite": "({duration}) / 1000000.0",
}
#: ``floor(log2(seconds) * BINS_PER_OCTAVE)`` (``LN``/``FLOOR`` on SQLite: its own from 3.35,
#: else Django's functions).
BIN_SQL = "FLOOR(LN({larger}({seconds}, {shortest})) / LN(2) * {per})"


class RunTimeBin(Func):
    """The histogram bin of a row's run time (``bin_of``, in SQL)."""

    output_field = IntegerField()

    def __init__(self) -> None:
        duration = F("date_done") - F("date_started")
        super().__init__(ExpressionWrapper(duration, output_field=DurationField()))

    def as_sql(self, compiler: Any, connection: Any, **extra_context: Any) -> tuple[str, list]:
        duration, params = compiler.compile(self.source_expressions[0])
        seconds = SECONDS_SQL.get(connection.vendor, SECONDS_SQL["mysql"])
        sql = BIN_SQL.format(
            larger="MAX" if connection.vendor == "sqlite" else "GREATEST",
            seconds=seconds.format(duration=duration),
            shortest=repr(SHORTEST),
            per=BINS_PER_OCTAVE,
        )
        return sql, list(params)


def bin_of(seconds: float) -> int:
    """The histogram bin of a run time (what ``BIN_SQL`` computes)."""
    return math.floor(math.log2(max(seconds, SHORTEST)) * BINS_PER_OCTAVE)


def bin_value(index: int) -> float:
    """The run time a bin stands for: its geometric middle."""
    return 2 ** ((index + 0.5) / BINS_PER_OCTAVE)


def percentile(histogram: Counter[int], fraction: float) -> float | None:
    """The run time at ``fraction`` of the runs (the rank ``percentile_cont`` interpolates
    at, rounded to the bin that holds it)."""
    runs = sum(histogram.values())
    if not runs:
        return None
    position = fraction * (runs - 1)
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen > position:
            return round(bin_value(index), 6)
    return round(bin_value(max(histogram)), 6)  # pragma: no cover - position < runs


def hour_of(moment: dt.datetime) -> dt.datetime:
    """The start of ``moment``'s hour: a UTC hour with ``USE_TZ``, else the naive one."""
    if timezone.is_aware(moment):
        moment = moment.astimezone(dt.timezone.utc)
    return moment.replace(minute=0, second=0, microsecond=0)


def utc_of(moment: dt.datetime) -> dt.tzinfo | None:
    return dt.timezone.utc if timezone.is_aware(moment) else None


@dataclass(frozen=True)
class Span:
    """Whole hours ``[first, end)`` read from rollups."""

    first: dt.datetime
    end: dt.datetime

    def hours(self) -> list[dt.datetime]:
        count = int((self.end - self.first) / dt.timedelta(hours=1))
        return [self.first + dt.timedelta(hours=i) for i in range(count)]

    def outside(self, since: dt.datetime) -> Q:
        """Final rows done at or after ``since`` but not in these hours."""
        before = Q(date_done__gte=since, date_done__lt=self.first)
        return Q(status__in=FINALS) & (before | Q(date_done__gte=self.end))


def sealable(since: dt.datetime, now: dt.datetime) -> Span | None:
    """The whole hours after ``since`` that can be sealed at ``now``; None if there are none
    or the window is wider than the rollups are kept."""
    if now - since > KEEP:
        return None
    first = hour_of(since)
    if first < since:
        first += dt.timedelta(hours=1)
    end = hour_of(now - SEAL_AFTER)
    return Span(first, end) if end > first else None


@dataclass
class Rollup:
    """What the sealed hours of a span hold."""

    #: task -> state -> rows
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    #: hour -> state -> rows (the chart)
    hours: dict[dt.datetime, Counter[str]] = field(default_factory=dict)
    #: task -> run-time histogram (SUCCESS and FAILURE)
    run_times: dict[str, Counter[int]] = field(default_factory=dict)

    def count(self, hour: dt.datetime, task: str, status: str, rows: int) -> None:
        self.counts.setdefault(task, Counter())[status] += rows
        self.hours.setdefault(hour, Counter())[status] += rows

    def ran(self, task: str, index: int, runs: int) -> None:
        self.run_times.setdefault(task, Counter())[index] += runs

    def has_runs(self) -> bool:
        return bool(self.run_times)


def applies(queryset: QuerySet) -> bool:
    """Rollups count every row of the table: a filtered queryset is read as it is."""
    return not queryset.query.has_filters()


def bin_expression() -> Case:
    """The run-time bin of a SUCCESS or FAILURE row with a start; NULL for other rows."""
    return Case(When(status__in=RUN_STATES, date_started__isnull=False, then=RunTimeBin()))


def live_figures(
    queryset: QuerySet, rows: Q
) -> tuple[dict[str, dict[str, int]], dict[str, Counter[int]]]:
    """Counts per task and state of ``rows``, and run-time histograms per task of the runs
    among them: one ``GROUP BY task, status, bin``."""
    found = (
        queryset.filter(rows)
        .order_by()
        .annotate(bin=bin_expression())
        .values_list("task", "status", "bin")
        .annotate(n=Count("pk"))
    )
    counts: dict[str, dict[str, int]] = {}
    histograms: dict[str, Counter[int]] = {}
    for task, status, index, n in found:
        per_state = counts.setdefault(task, {})
        per_state[status] = per_state.get(status, 0) + n
        if index is not None:
            histograms.setdefault(task, Counter())[int(index)] += n
    return counts, histograms


def read(
    queryset: QuerySet, span: Span, now: dt.datetime, *, run_times: bool = True
) -> Rollup | None:
    """The rollups of ``span`` (without run times if not ``run_times``: the chart), sealing
    the hours not sealed yet; None when they cannot be written (a read-only database:
    ``stats()`` then reads the rows). Two statements: the counts per hour, task and state;
    the run-time histograms summed per task and bin by the database."""
    using = queryset.db
    rollup = Rollup()
    sealed: set[dt.datetime] = set()
    stored = (
        StatsHour.objects.using(using)
        .between(span.first, span.end)
        .values_list("hour", "counts__task", "counts__status", "counts__count")
    )
    for hour, task, status, rows in stored:
        sealed.add(hour)
        if task is not None:
            rollup.count(hour, task, status, rows)
    missing = [hour for hour in span.hours() if hour not in sealed]
    if missing:
        try:
            counted = seal(queryset, missing, now)
        except DatabaseError as exc:
            logger.warning(
                "stats: could not seal %d hours (%s: %s); reading the rows",
                len(missing),
                type(exc).__name__,
                exc,
            )
            return None
        for row in counted:
            rollup.count(row.hour_id, row.task, row.status, row.count)
    if not run_times or not any(rollup.counts[t][s] for t in rollup.counts for s in RUN_STATES):
        return rollup
    histograms = (
        StatsHourRunTimes.objects.using(using)
        .filter(hour__gte=span.first, hour__lt=span.end)
        .order_by()
        .values_list("task", "bin")
        .annotate(runs=Sum("runs"))
    )
    for task, index, runs in histograms:
        rollup.ran(task, index, runs)
    return rollup


def seal(
    queryset: QuerySet, hours: Iterable[dt.datetime], now: dt.datetime
) -> list[StatsHourCount]:
    """Count the final rows of ``hours`` (one ``GROUP BY`` over their range) and keep the
    counts and run-time bins; hours another process sealed meanwhile keep its counts. Drops
    hours older than ``KEEP``. Returns the counts of ``hours`` (``read`` sums the bins of the
    whole span in the database afterwards)."""
    hours = sorted(hours)
    first, end = hours[0], hours[-1] + dt.timedelta(hours=1)
    wanted = set(hours)
    found = (
        queryset.filter(status__in=FINALS, date_done__gte=first, date_done__lt=end)
        .order_by()
        .annotate(hour=TruncHour("date_done", tzinfo=utc_of(first)), bin=bin_expression())
        .values_list("hour", "task", "status", "bin")
        .annotate(n=Count("pk"))
    )
    counts: dict[tuple, StatsHourCount] = {}
    bins: dict[tuple, StatsHourRunTimes] = {}
    for hour, task, status, index, n in found:
        if hour not in wanted:
            continue
        row = counts.get((hour, task, status))
        if row is None:
            row = counts[(hour, task, status)] = StatsHourCount(
                hour_id=hour, task=task, status=status, count=0
            )
        row.count += n
        if index is not None:
            index = int(index)
            ran = bins.get((hour, task, index))
            if ran is None:
                ran = bins[(hour, task, index)] = StatsHourRunTimes(
                    hour_id=hour, task=task, bin=index, runs=0
                )
            ran.runs += n
    using = queryset.db
    # The delete reads the aged hours before it deletes them and their counts: on SQLite the
    # transaction takes the write lock first (docs/design.md, "SQLite: transactions write
    # first"), else a worker's commit in between made it fail.
    with db.writing_first(using):
        StatsHour.objects.using(using).aged(now - KEEP).delete()
        StatsHour.objects.using(using).bulk_create(
            [StatsHour(hour=hour, sealed_at=now) for hour in hours], ignore_conflicts=True
        )
        for model, rows in ((StatsHourCount, counts), (StatsHourRunTimes, bins)):
            model.objects.using(using).bulk_create(list(rows.values()), ignore_conflicts=True)
    return list(counts.values())


def forget(using: str) -> None:
    """Drop every rollup: rows were written into hours already counted (an import of old
    results). The next ``stats()`` counts the hours again."""
    StatsHour.objects.using(using).all().delete()
