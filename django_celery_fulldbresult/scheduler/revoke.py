"""Revoking tasks that wait in the database: cancel, revoke, expiry.

A waiting row becomes REVOKED in one transaction on the package's own connection, and
what Celery's broker path does for a revoked task follows: a chord header part reports to
its chord (``on_chord_part_return``), so the chord fails instead of waiting for ever.

``revoke_waiting(..., in_flight=True)`` (what ``AsyncResult.revoke()`` does through the
wrapped ``app.control.revoke``) also revokes a row a sender holds right now; its message
may already be on its way, so every forwarded message carries a header and a worker that
receives one takes the row first (``receipt``): a revoked row never runs, even when no
worker was up to hear the broadcast.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.utils.functional import maybe_list
from django.db import transaction

from .. import chords, conf, db
from . import claims
from .rows import revoked_columns

logger = logging.getLogger(__name__)

CANCELLED = "cancelled before it was sent"
EXPIRED = "expired before it was sent"
REVOKED = "revoked"


def revoke_waiting(
    app: Any,
    task_ids: Iterable[str],
    reason: str,
    in_flight: bool = False,
    using: str | None = None,
) -> list[str]:
    """Make these tasks REVOKED if they still wait in the database; the ids revoked.

    Unclaimed SCHEDULED rows are guaranteed never to be sent. With ``in_flight``, a row a
    sender holds right now is revoked too (its worker will refuse it).
    """
    task_ids = list(task_ids)
    if not task_ids:
        return []
    token = uuid.uuid4()

    def revoke(alias: str) -> list[dict[str, Any]]:
        waiting = claims.rows(alias).filter(task_id__in=task_ids).scheduled()
        if not in_flight:
            waiting = waiting.unclaimed()
        with transaction.atomic(using=alias):
            # The token marks what this statement revoked (a sender may claim meanwhile).
            if not waiting.update(**revoked_columns(reason), scheduled_id=token):
                return []
            mine = claims.rows(alias).filter(task_id__in=task_ids, scheduled_id=token)
            revoked = list(mine.values("id", "task_id", "group_id", "options"))
            mine.update(scheduled_id=None, date_claimed=None)
        return revoked

    # The alias is resolved in the thread that runs it (the helper thread in async code).
    revoked = db.outside_event_loop(lambda: db.run_with_reconnect(revoke, using))
    report_to_chords(app, revoked, reason)
    return [row["task_id"] for row in revoked]


def expire_due(app: Any, using: str) -> int:
    """Revoke due rows whose ``expires`` passed: they are never sent."""
    expired = _revoke_expired(using)
    report_to_chords(app, expired, EXPIRED)
    return len(expired)


@db.retry_deadlocks
def _revoke_expired(using: str) -> list[dict[str, Any]]:
    """Claim and revoke the expired rows, in one transaction; what it revoked."""
    token = uuid.uuid4()
    with transaction.atomic(using=using):
        expired = claims.claim_expired(using, token)
        if expired:
            claims.rows(using).filter(id__in=[row["id"] for row in expired]).claimed(token).update(
                **revoked_columns(EXPIRED), scheduled_id=None, date_claimed=None
            )
    return expired


def report_to_chords(app: Any, revoked: list[dict[str, Any]], reason: str) -> None:
    """What a worker does for a revoked chord header part: report it to its chord (which
    then fails, its errbacks called), as ``backend.mark_as_revoked`` would."""
    chords.report_ended_parts(app, revoked, states.REVOKED, TaskRevokedError(reason))


# -- AsyncResult.revoke() and the workers -----------------------------------------------


def wrap_control(app: Any) -> None:
    """``app.control.revoke`` (``AsyncResult.revoke()``, ``GroupResult.revoke()``) revokes
    rows waiting in the database first, then broadcasts to the workers as usual."""
    control = app.control
    if "revoke" in vars(control):
        return
    original = control.revoke

    def revoke(task_id: Any, *args: Any, **kwargs: Any) -> Any:
        if conf.get("SCHEDULE_ETA"):
            try:
                revoke_waiting(app, maybe_list(task_id), REVOKED, in_flight=True)
            except Exception:  # noqa: BLE001 - the broadcast still goes out
                logger.exception("scheduler: could not revoke %s in the database", task_id)
        return original(task_id, *args, **kwargs)

    revoke.__wrapped__ = original  # type: ignore[attr-defined]
    control.revoke = revoke


def unwrap_control(app: Any) -> None:
    vars(app.control).pop("revoke", None)
