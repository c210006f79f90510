"""How the task admin shows a row's values: state badges, JSON, text, durations, children."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django.utils.html import format_html

from ..states import (
    FAILURE,
    PENDING,
    RECEIVED,
    RETRY,
    REVOKED,
    SCHEDULED,
    SCHEDULED_SENT,
    STARTED,
    SUCCESS,
)

#: Background colour of each state's badge; custom states get the neutral one.
STATE_COLOURS = {
    SUCCESS: "#2e7d32",
    FAILURE: "#c62828",
    REVOKED: "#6d4c41",
    STARTED: "#1565c0",
    RETRY: "#ef6c00",
    PENDING: "#757575",
    RECEIVED: "#546e7a",
    SCHEDULED: "#6a1b9a",
    SCHEDULED_SENT: "#8e24aa",
}
NEUTRAL_COLOUR = "#37474f"


def state_badge(status: str) -> str:
    colour = STATE_COLOURS.get(status, NEUTRAL_COLOUR)
    return format_html(
        '<span class="fdr-state" style="background:{};color:#fff;padding:1px 6px;'
        'border-radius:8px;font-weight:bold;white-space:nowrap">{}</span>',
        colour,
        status,
    )


def pretty_json(value: Any) -> str:
    """Indented JSON in a <pre>, escaped (datetimes and other typed values as text)."""
    if value is None:
        return "-"
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre class="fdr-json" style="white-space:pre-wrap">{}</pre>', text)


def pre(text: str | None) -> str:
    if not text:
        return "-"
    return format_html('<pre class="fdr-text" style="white-space:pre-wrap">{}</pre>', text)


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    if seconds < 60:
        return f"{seconds:.3f} s"
    return str(timedelta(seconds=round(seconds)))


def child_ids(meta: dict | None) -> list[str]:
    """Task ids of the children Celery recorded (result tuples; groups nest theirs)."""
    ids: list[str] = []

    def walk(node: Any) -> None:
        if not isinstance(node, (list, tuple)) or len(node) != 2:
            return
        head, members = node
        if members:  # a group: its members are the children
            for member in members:
                walk(member)
        elif isinstance(head, (list, tuple)) and head and isinstance(head[0], str):
            ids.append(head[0])

    for child in (meta.get("children") if isinstance(meta, dict) else None) or ():
        walk(child)
    return ids
