"""The time-delta options shared by the commands (0.5.x names of the stale-task commands)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

DELTA_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "microseconds")


def non_negative(text: str) -> float:
    """An age: a number of units, never negative (argparse says which option is wrong)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or value != value:  # NaN too
        raise argparse.ArgumentTypeError(f"must be zero or more, not {text}")
    return value


def add_delta_arguments(
    parser: Any, what: str, template: str = "Report {what} older than this many {unit}"
) -> None:
    for unit in DELTA_UNITS:
        parser.add_argument(
            f"--{unit}",
            type=non_negative,
            default=0,
            help=template.format(what=what, unit=unit) + " (added to the other units).",
        )


def age_given(options: dict[str, Any]) -> bool:
    return any(options.get(unit) for unit in DELTA_UNITS)


def delta_from_options(options: dict[str, Any]) -> timedelta:
    return timedelta(**{unit: options.get(unit) or 0 for unit in DELTA_UNITS})


#: The columns a listing command reads (plain values: no model instances, no JSON decoding).
ROW_FIELDS = ("task_id", "task", "status", "reference_date", "eta", "hostname")


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def write_rows(command: Any, header: str, rows: Iterable[dict[str, Any]], as_json: bool) -> int:
    """Print rows (dicts of ROW_FIELDS) in the 0.5.x format or as JSON; return the count."""
    if as_json:
        items = [
            {
                "task_id": row["task_id"],
                "task": row["task"],
                "status": row["status"],
                "date": _iso(row["reference_date"]),
                "eta": _iso(row["eta"]),
                "hostname": row["hostname"],
            }
            for row in rows
        ]
        command.stdout.write(json.dumps(items, indent=2))
        return len(items)
    command.stdout.write(header)
    count = 0
    for row in rows:
        command.stdout.write(f"  {row['reference_date']} - {row['task_id']}: {row['task']}")
        count += 1
    if not count:
        command.stdout.write("  none")
    return count
