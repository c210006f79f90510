from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError

from django_celery_fulldbresult import prometheus
from django_celery_fulldbresult.management.base import DocumentedCommand
from django_celery_fulldbresult.management.delta import add_delta_arguments, delta_from_options
from django_celery_fulldbresult.models import TaskResultMeta

DEFAULT_WINDOW = timedelta(hours=24)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def window_text(seconds: float) -> str:
    """A window as a person says it: "24 hours", "7 days", "90 minutes", "45 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        count, rest = divmod(seconds, size)
        if not rest and count and (unit != "day" or count > 1):
            if unit == "hour" and count % 24 == 0 and count > 24:
                continue
            count = int(count)
            return f"{count} {unit}" + ("s" if count != 1 else "")
    return f"{seconds:g} seconds"


def render_text(stats: dict[str, Any]) -> str:
    """A report for a terminal: totals first, then one line per task name."""
    window = window_text(stats["window"]["seconds"])
    runtime = stats["runtime"]
    if runtime["exact"]:
        how = "exact"
    elif runtime["method"] == "histogram":
        how = f"each within {runtime['relative_error']:.1%}"
    else:
        how = f"of the {runtime['runs']} most recent runs"
    lines = [
        f"Task results over the last {window} (since {stats['window']['start']})",
        f"  total {stats['total']}, failure rate {_percent(stats['failure_rate'])}",
        f"  run time p50 {_seconds(runtime['p50'])}, p90 {_seconds(runtime['p90'])}, "
        f"p99 {_seconds(runtime['p99'])} ({runtime['runs']} runs, {how})",
        "By state:",
        *(f"  {state:<16} {n:>10}" for state, n in stats["states"].items()),
        "By task:",
    ]
    header = f"  {'task':<40} {'total':>8} {'failed':>7} {'p50':>9} {'p90':>9} {'p99':>9}  states"
    lines.append(header)
    for task, figures in stats["tasks"].items():
        run = figures["runtime"] or {}
        per_state = ", ".join(f"{s} {n}" for s, n in figures["states"].items())
        lines.append(
            f"  {task or '(unknown)':<40} {figures['total']:>8} "
            f"{_percent(figures['failure_rate']):>7} {_seconds(run.get('p50')):>9} "
            f"{_seconds(run.get('p90')):>9} {_seconds(run.get('p99')):>9}  {per_state}"
        )
    stale, scheduled = stats["stale"], stats["scheduled"]
    lines += [
        f"Stale: {stale['tasks']} task(s) without progress for "
        f"{timedelta(seconds=stale['after_seconds'])}; {stale['scheduled_claims']} scheduled "
        f"claim(s) older than {timedelta(seconds=stale['claim_after_seconds'])}",
        f"Scheduled: {scheduled['backlog']} waiting, {scheduled['due']} due now"
        + (
            f", oldest overdue by {scheduled['lateness_seconds']:.1f}s "
            f"(eta {scheduled['oldest_due_eta']})"
            if scheduled["due"]
            else ""
        ),
    ]
    return "\n".join(lines)


class Command(DocumentedCommand):
    help = (
        "Print task counts per state and task name, failure rate, run-time percentiles, stale "
        "counts and the scheduled backlog for a time window (default: the last 24 hours)."
    )

    def add_arguments(self, parser: Any) -> None:
        add_delta_arguments(parser, "", template="Window length in {unit}")
        parser.add_argument(
            "--format",
            choices=("text", "json", "prometheus"),
            default="text",
            help="text (default), json, or Prometheus text exposition format.",
        )
        parser.add_argument(
            "--exact",
            action="store_true",
            help="Read every row of the window, not the hourly rollups of its past hours "
            "(exact run-time percentiles; slower on a large table).",
        )
        parser.add_argument(
            "--stale-minutes",
            type=float,
            default=60.0,
            help="Unfinished tasks without progress for this long count as stale (default 60).",
        )
        parser.add_argument(
            "--claim-minutes",
            type=float,
            default=5.0,
            help="Scheduled claims older than this count as stale (default 5).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        window = delta_from_options(options) or DEFAULT_WINDOW
        if window <= timedelta(0):
            raise CommandError("the window must be positive")
        stats = TaskResultMeta.objects.stats(
            window,
            stale_after=timedelta(minutes=options["stale_minutes"]),
            claim_stale_after=timedelta(minutes=options["claim_minutes"]),
            exact=options["exact"],
        )
        if options["format"] == "json":
            self.stdout.write(json.dumps(stats, indent=2))
        elif options["format"] == "prometheus":
            self.stdout.write(prometheus.render(stats), ending="")
        else:
            self.stdout.write(render_text(stats))
