"""The figures of ``stats()`` in Prometheus' text exposition format (version 0.0.4).

Every metric is a gauge: the counts describe a sliding window, not a counter since
process start (``celery_fulldbresult_tasks_total`` keeps the name people search for).
Figures that do not exist (no run in the window, nothing overdue) are left out
rather than exported as NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

PREFIX = "celery_fulldbresult_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[dict[str, str], float | int | None]


def escape_label(value: str) -> str:
    """Backslash, double quote and line feed are escaped in label values."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _metric(name: str, help_text: str, samples: Iterable[Sample]) -> Iterator[str]:
    full = PREFIX + name
    yield f"# HELP {full} {escape_help(help_text)}"
    yield f"# TYPE {full} gauge"
    for labels, value in samples:
        if value is None:
            continue
        inner = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in labels.items())
        yield f"{full}{{{inner}}} {_number(value)}" if inner else f"{full} {_number(value)}"


def _quantiles(runtime: dict[str, Any] | None, labels: dict[str, str]) -> Iterator[Sample]:
    for key, value in (runtime or {}).items():
        if key.startswith("p") and key[1:].replace(".", "").isdigit():
            yield {**labels, "quantile": repr(float(key[1:]) / 100)}, value


def render(stats: dict[str, Any]) -> str:
    tasks = stats["tasks"]
    scheduled = stats["scheduled"]
    lines = [
        *_metric(
            "window_seconds",
            "Length of the window the counts, rates and run times cover.",
            [({}, stats["window"]["seconds"])],
        ),
        *_metric(
            "tasks_total",
            "Task rows whose last state change falls in the window, by state and task name.",
            (
                ({"state": state, "task": task}, n)
                for task, figures in tasks.items()
                for state, n in figures["states"].items()
            ),
        ),
        *_metric(
            "failure_ratio",
            "FAILURE / (SUCCESS + FAILURE) of the rows finished in the window.",
            [({}, stats["failure_rate"])],
        ),
        *_metric(
            "task_failure_ratio",
            "FAILURE / (SUCCESS + FAILURE) of the rows finished in the window, by task name.",
            (({"task": task}, figures["failure_rate"]) for task, figures in tasks.items()),
        ),
        *_metric(
            "runtime_seconds",
            "Run time (date_done - date_started) percentiles of the runs done in the window.",
            _quantiles(stats["runtime"], {}),
        ),
        *_metric(
            "task_runtime_seconds",
            "Run time percentiles of the runs done in the window, by task name.",
            (
                sample
                for task, figures in tasks.items()
                for sample in _quantiles(figures["runtime"], {"task": task})
            ),
        ),
        *_metric(
            "task_runs",
            "Runs (SUCCESS or FAILURE with a start time) the run-time percentiles are from.",
            (
                ({"task": task}, (figures["runtime"] or {}).get("runs"))
                for task, figures in tasks.items()
            ),
        ),
        *_metric(
            "stale_tasks",
            "Unfinished tasks with no progress for the stale threshold (get_stale_tasks).",
            [({}, stats["stale"]["tasks"])],
        ),
        *_metric(
            "stale_scheduled_claims",
            "Scheduled tasks claimed by a sender that never recorded them as sent.",
            [({}, stats["stale"]["scheduled_claims"])],
        ),
        *_metric(
            "scheduled_tasks",
            "Tasks waiting in the database for their eta (SCHEDULED rows).",
            [({}, scheduled["backlog"])],
        ),
        *_metric(
            "scheduled_due_tasks",
            "SCHEDULED rows whose eta has passed (not yet forwarded).",
            [({}, scheduled["due"])],
        ),
        *_metric(
            "scheduled_lateness_seconds",
            "How far past its eta the oldest overdue SCHEDULED row is (database clock).",
            [({}, scheduled["lateness_seconds"] if scheduled["due"] else 0.0)],
        ),
    ]
    return "\n".join(lines) + "\n"
