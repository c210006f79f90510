"""What an operator does to waiting tasks (the admin's actions, the commands): cancel one,
send some now, resend the claims of a sender that died.

Each runs on the package's own connection, committed at once: a caller's transaction that
rolls back (``ATOMIC_REQUESTS`` around an admin action) cannot undo a claim or a record
after the task was published, so nothing is ever sent twice.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import timedelta
from typing import Any

from celery import current_app

from .. import conf, db
from ..db import DatabaseNow
from . import claims, revoke
from .rows import ClaimedRow, PassResult
from .sender import Sender, refuse_in_sqlite_transaction

#: Outcomes of ``send_now``, per task id.
SENT, FAILED, RELEASED, NOT_CLAIMED = "sent", "failed", "released", "not claimed"


def cancel_scheduled(task_id: str, app: Any = None, using: str | None = None) -> bool:
    """Revoke a scheduled task that was not sent yet; True means it never will be.

    False when the task is not waiting (already sent, running, finished) or a sender holds
    it right now (in flight: it may be on its way to the broker; ``AsyncResult.revoke()``
    revokes such a task too, see ``revoke``). A chord it belongs to fails.
    """
    app = app or current_app
    return bool(revoke.revoke_waiting(app, [task_id], revoke.CANCELLED, using=using))


def send_now(
    app: Any, task_ids: list[str], using: str | None = None, sender: Sender | None = None
) -> dict[str, str]:
    """Forward these scheduled tasks now instead of at their eta; task id -> what happened.

    Claim-safe: the rows are claimed with a token of our own by the same conditional UPDATE
    a sender uses (only unclaimed, unexpired SCHEDULED rows), then published and recorded
    by a sender of its own (``sender``: one the caller keeps, left open; the transactional
    publish's on-commit hook). A row a sender holds, or that is no longer SCHEDULED, is left
    alone. Outcomes: ``sent``, ``failed``, ``released`` (broker down: SCHEDULED again),
    ``not claimed`` (not waiting, expired, or held by a sender).
    """
    refuse_in_sqlite_transaction("send_now")
    using = sender.using if sender is not None else using or db.task_db_alias()
    outcomes = dict.fromkeys(task_ids, NOT_CLAIMED)
    with contextlib.nullcontext(sender) if sender is not None else Sender(app, using) as sender:
        token = uuid.uuid4()

        sender.leases.hold(token)  # held (renewed) until recorded, as a sender's batch
        try:
            rows = sender.database.run(claims.claim_tasks, using, token, task_ids)
            if not rows:
                return outcomes
            published = sender.publisher.publish(rows, token)
            sender.database.run(sender.record, published)
        finally:
            sender.leases.drop(token)
    for row_id in published.sent + published.unconfirmed:
        outcomes[_task_id(rows, row_id)] = SENT
    for row_id, _error in published.failures:
        outcomes[_task_id(rows, row_id)] = FAILED
    for row_id in published.unsent:
        outcomes[_task_id(rows, row_id)] = RELEASED
    return outcomes


def make_due(task_ids: list[str], using: str | None = None) -> set[str]:
    """Make these scheduled tasks due now, for the next pass of a sender; the ids that
    were. For what the caller's process must not decode (the admin never unpickles): the
    sender, which decodes what the app accepts, sends them. Rows a sender holds, expired or
    no longer waiting are left alone."""
    using = using or db.task_db_alias()

    def due(alias: str) -> set[str]:
        waiting = claims.rows(alias).filter(task_id__in=task_ids).scheduled().unclaimed()
        waiting = waiting.unexpired()
        ids = set(waiting.values_list("task_id", flat=True))
        waiting.filter(task_id__in=ids).update(eta=DatabaseNow())
        return ids

    return db.run_with_reconnect(due, using)


def _task_id(rows: list[ClaimedRow], row_id: int) -> str:
    return next(row["task_id"] for row in rows if row["id"] == row_id)


def safe_resend_age() -> timedelta:
    """The youngest claim ``resend_stale`` may take: a live sender has given up on a batch
    (its confirm timeout) long before, with room for a slow database."""
    return timedelta(seconds=max(60.0, 4 * float(conf.get("SCHEDULER_CONFIRM_TIMEOUT"))))


def resend_stale(
    app: Any, rows: list[ClaimedRow], using: str | None = None, min_age: timedelta | None = None
) -> PassResult:
    """Re-send claimed rows a crashed sender left behind (on purpose: may duplicate).

    Only claims older than ``min_age`` (default ``safe_resend_age()``) are taken, by their
    own token, so a live sender's batch in flight is never sent twice. One broker
    connection for all of them.
    """
    refuse_in_sqlite_transaction("resend_stale")
    using = using or db.task_db_alias()
    min_age = safe_resend_age() if min_age is None else min_age
    outcome = PassResult()
    with Sender(app, using) as sender:
        old_enough = set(
            sender.database.run(
                lambda: list(
                    claims.rows(using)
                    .get_stale_scheduled_tasks(min_age)
                    .filter(id__in=[row["id"] for row in rows])
                    .values_list("id", flat=True)
                )
            )
        )
        for row in rows:
            if row["id"] not in old_enough:
                continue
            token = row["scheduled_id"]  # type: ignore[typeddict-item]
            published = sender.publisher.publish([row], token)
            released = sender.database.run(sender.record, published)
            outcome.add(published.outcome(1, released))
    return outcome
