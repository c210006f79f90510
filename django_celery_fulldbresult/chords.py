"""Chords counted in the database: each header part counts once, one call completes the chord.

The protocol (docs/design.md, "Chords"), one function per step:

1. ``start`` (``apply_chord``, before any header task is sent): a fresh counter. A frozen
   chord applied again reuses its group id, and is a new run.
2. ``set_size`` (``set_chord_size``) and ``grow`` (``Task.add_to_chord``): how many parts.
3. ``count_part`` (every finished header part), one transaction: the part is recorded once
   per ``(task id, group index)``; a new part raises the count; the call that finds every
   part counted takes the claim (a token of its own) unless another live claim holds it.
   Repeating the call with the same token gives the same answer, so it is safe to retry
   after a lost connection, even when the first attempt committed.
4. ``renew`` just before the body is sent: a claim that is no longer ours sends nothing.
5. ``finish`` once the body is sent or the chord failed: the counter is marked done, the
   parts and the header group row are deleted. A late copy of a part then finds a finished
   chord and does nothing; finished counters expire with the results (``expire``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery.app.task import Context
from django.db import transaction
from django.utils import timezone

from . import db
from .models import ChordCounter, ChordPart, GroupResultMeta

logger = logging.getLogger(__name__)

#: A claim not renewed for this long may be taken over by a later copy of a part (its
#: holder is presumed dead). Well above the default join timeout plus a publish.
CLAIM_LEASE = timedelta(seconds=60)


class Progress(enum.Enum):
    #: No counter: not a chord of this backend, or finished and expired since.
    UNKNOWN = "unknown"
    #: The chord was completed already: this is a late copy of a part.
    FINISHED = "finished"
    #: Parts are still missing, or another live call is completing the chord.
    WAITING = "waiting"
    #: This call holds the claim: it joins the header and sends the body.
    CLAIMED = "claimed"


@dataclass(frozen=True)
class PartCount:
    progress: Progress
    count: int = 0
    total: int | None = None


def start(group_id: str, using: str) -> None:
    """A fresh counter for a chord about to send its header."""
    now = timezone.now()
    with transaction.atomic(using=using):
        # The counter first, then its parts: the lock order of every chord transaction.
        if not ChordCounter.objects.using(using).of(group_id).restart(now):
            _create_counter(ChordCounter(group_id=group_id, date_created=now), using, RESTART)
        ChordPart.objects.using(using).of(group_id).delete()


def set_size(group_id: str, total: int, using: str) -> None:
    """Celery sets the size just before sending the last header task, while the first parts
    are being counted: an UPDATE of the existing counter (an upsert deadlocked there on
    InnoDB)."""
    if not ChordCounter.objects.using(using).of(group_id).resize(total):
        _create_counter(ChordCounter(group_id=group_id, total=total), using, ["total"])


#: The columns a new run of a chord starts afresh.
RESTART = ["count", "total", "added", "date_created", "claimed_by", "date_claimed", "date_done"]


def _create_counter(counter: ChordCounter, using: str, update_fields: list[str]) -> None:
    """A counter that did not exist yet: an upsert, for a concurrent call creating it too
    (``update_fields`` are what that call's row takes from ours)."""
    db.upsert(
        ChordCounter, using, [counter], unique_fields=["group_id"], update_fields=update_fields
    )


def grow(group_id: str, parts: int, using: str) -> bool:
    """``Task.add_to_chord``; False when the chord is unknown or finished (nothing changed).
    Call it inside the caller's transaction, as its first statement on the chord."""
    counters = ChordCounter.objects.using(using).of(group_id)
    counters.grow(parts)
    counter = counters.first()
    return counter is not None and counter.date_done is None


def count_part(
    group_id: str,
    task_id: str,
    group_index: int | None,
    token: str,
    using: str,
    fallback_total: int | None = None,
    lease: timedelta = CLAIM_LEASE,
) -> PartCount:
    """Count a finished header part once; claim the chord when it is the last one.

    Three statements for a new part that does not complete the chord (raise the count,
    read the counter, insert the part), a fourth to claim it. The count is raised first:
    that UPDATE takes the counter's row lock (SQLite's write lock) before anything else,
    so parts of one chord are counted one at a time. A copy of a part counted before takes
    its count back; nothing is written for a chord that is unknown or finished.
    """
    now = timezone.now()
    counters = ChordCounter.objects.using(using).of(group_id)
    part = {
        "group_id": group_id,
        "task_id": task_id,
        "group_index": -1 if group_index is None else int(group_index),
    }
    with transaction.atomic(using=using):
        counters.add_part()
        counter = counters.first()
        unfinished = counter is not None and counter.date_done is None
        if unfinished and not db.insert_if_absent(ChordPart, using, part):
            counters.take_back_part()  # counted already: a redelivered or retried part
            counter.count -= 1
        counted = _progress(counter, token, now - lease, fallback_total)
        if counted.progress is Progress.CLAIMED:
            counters.claim(token, now)
    return counted


def _progress(
    counter: ChordCounter | None, token: str, stale_before: datetime, fallback_total: int | None
) -> PartCount:
    if counter is None:
        return PartCount(Progress.UNKNOWN)
    if counter.date_done is not None:
        return PartCount(Progress.FINISHED, counter.count, counter.total)
    if counter.is_complete(fallback_total) and counter.is_claimable(token, stale_before):
        return PartCount(Progress.CLAIMED, counter.count, counter.total)
    return PartCount(Progress.WAITING, counter.count, counter.total)


def renew(group_id: str, token: str, using: str) -> bool:
    """Refresh our claim before sending the body; False when it was taken over."""
    counters = ChordCounter.objects.using(using).of(group_id)
    return bool(counters.held_by(token).renew(timezone.now()))


def finish(group_id: str, token: str, using: str) -> bool:
    """Mark the chord done; False when the claim was no longer ours (nothing changed)."""
    with transaction.atomic(using=using):
        # The counter first, then its parts: the lock order of every chord transaction.
        if not ChordCounter.objects.using(using).of(group_id).held_by(token).finish(timezone.now()):
            return False
        ChordPart.objects.using(using).of(group_id).delete()
        GroupResultMeta.objects.using(using).filter(group_id=group_id).delete()
    return True


def expire(cutoff: datetime, using: str) -> int:
    """Delete finished chords done before ``cutoff``; running chords are never expired."""
    deleted, _ = ChordCounter.objects.using(using).finished_before(cutoff).delete()
    return deleted


def report_ended_parts(
    app: Any, rows: Iterable[Mapping[str, Any]], state: str, error: BaseException
) -> None:
    """What a worker does for a header part that ended without running to its end (revoked
    before it ran, its worker lost): report it to its chord, which then fails with ``error``
    and calls its errbacks (as ``backend.mark_as_revoked`` / ``mark_as_failure`` do).

    ``rows``: dicts of the ended rows' ``task_id``, ``group_id`` and ``options``; rows that
    are no chord header part are skipped.
    """
    for row in rows:
        options = row.get("options") or {}
        if not row.get("group_id") or not options.get("chord"):
            continue
        request = Context(
            id=row["task_id"],
            group=row["group_id"],
            group_index=options.get("group_index"),
            chord=options["chord"],
            delivery_info={},
        )
        try:
            app.backend.on_chord_part_return(request, state, error)
        except Exception:  # noqa: BLE001 - the row has ended whatever the chord does
            logger.exception("chord of the %s task %s could not be told", state, row["task_id"])
