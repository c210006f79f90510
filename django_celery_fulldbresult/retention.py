"""Retention: which rows ``purge_task_results`` deletes, counted first, deleted in batches.

One rule (a ``Q``) serves both the count and the delete: the batched raw DELETE uses
the rule's own compiled WHERE clause, so a dry run counts exactly what a real run
deletes. Final rows are aged by ``date_done``, the others by ``date_modified`` (each
with its index).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from datetime import datetime

from django.db import connections
from django.db.models import Count, Q, QuerySet

from . import db
from .managers import delete_where_in_batches
from .states import ALL_STATES, FINAL_STATES

_FINALS = sorted(FINAL_STATES)


class UnknownState(ValueError):
    pass


class UnfinishedStateRefused(ValueError):
    pass


def check_states(
    queryset: QuerySet, states: Iterable[str] | None, include_unfinished: bool
) -> list[str] | None:
    """The states to purge (None: every state), or an error for unknown or refused states.

    A state that is neither a Celery nor a scheduler state is accepted only if some row
    has it (custom ``update_state`` states); anything else is most likely a typo.
    """
    if states is None:
        return None if include_unfinished else _FINALS
    chosen = sorted(set(states))
    for state in chosen:
        if state not in ALL_STATES and not queryset.filter(status=state).exists():
            known = ", ".join(sorted(ALL_STATES))
            raise UnknownState(f"unknown state {state!r} (no row has it; known: {known})")
    refused = [s for s in chosen if s not in FINAL_STATES]
    if refused and not include_unfinished:
        raise UnfinishedStateRefused(
            f"{', '.join(refused)}: unfinished state(s); add --include-unfinished to delete "
            "such rows"
        )
    return chosen


def purge_rule(cutoff: datetime, states: list[str] | None) -> Q:
    """Rows of ``states`` (None: any) whose final or last state change is before ``cutoff``."""
    finals = _FINALS if states is None else [s for s in states if s in FINAL_STATES]
    others = None if states is None else [s for s in states if s not in FINAL_STATES]
    branches = []
    if finals:
        branches.append(Q(status__in=finals, date_done__lt=cutoff))
    if others is None:
        branches.append(~Q(status__in=_FINALS) & Q(date_modified__lt=cutoff))
    elif others:
        branches.append(Q(status__in=others, date_modified__lt=cutoff))
    return functools.reduce(operator.or_, branches)


def count_by_state(queryset: QuerySet, rule: Q) -> dict[str, int]:
    """What ``rule`` matches, per state (one statement)."""
    rows = queryset.filter(rule).order_by().values_list("status").annotate(n=Count("pk"))
    return dict(sorted(rows))


def delete(
    queryset: QuerySet,
    rule: Q,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete what ``rule`` matches, ``batch_size`` rows per raw statement (no signals)."""
    where, params = db.compiled_where(queryset.filter(rule))
    return delete_where_in_batches(
        queryset.model, connections[queryset.db], where, params, batch_size, progress
    )
