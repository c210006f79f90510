"""Recovering the tasks of a lost worker: send them again, fail them, or report them.

A worker that dies (SIGKILL, OOM, a lost node) leaves the rows of the tasks it held RECEIVED
or STARTED for ever; ``get_stale_tasks`` finds them once its heartbeat stops. Each task has a
policy (``recover``): ``"resend"`` (idempotent tasks: sent again, same id, same attempt),
``"fail"`` (FAILURE with a ``WorkerLostError``, as Celery records a prefork child that died)
or ``"report"`` (left as it is, listed). The policy is the task's ``recover`` attribute, else
the first pattern of ``DJANGO_CELERY_FULLDBRESULT_RECOVER`` matching its name, else
``"report"``. A RECEIVED row of a task that tracks its start never started: it is always sent
again when it can be.

``recover_stale`` applies the policies (a running sender calls it every so often,
``RECOVER_AFTER``); ``find_stale_tasks --resend`` / ``--mark-failed`` apply one action to
every recoverable row. Every transition is one conditional UPDATE guarded by the rule that
found the row (``TaskResultQuerySet.recoverable``, re-applied in the statement) and the state
that was read: two senders, or a sender and an operator, never both act on a row.
"""

from __future__ import annotations

import fnmatch
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypedDict

from billiard.exceptions import WorkerLostError
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import chords, conf, db, encryption, records, serialization
from .models import TaskResultMeta
from .result_backends import DatabaseResultBackend
from .scheduler import operations
from .states import FAILURE, RECEIVED

logger = logging.getLogger(__name__)

RESEND, FAIL, REPORT = "resend", "fail", "report"
POLICIES = (RESEND, FAIL, REPORT)
DEFAULT_POLICY = REPORT

#: Who recovered a row, as the row's note and the failure's reason say.
BY_SENDER = "the scheduler's sender (RECOVER_AFTER)"
BY_COMMAND = "manage.py find_stale_tasks"
#: Task ids named per outcome in a log line (a lost worker may have held thousands).
LOGGED_IDS = 50


# -- the policy ------------------------------------------------------------------------


def check_policy(value: Any, where: str) -> str:
    """``value`` if it is a policy; ImproperlyConfigured naming ``where`` otherwise."""
    if value not in POLICIES:
        raise ImproperlyConfigured(
            f"{where}: recovery policy must be one of {', '.join(map(repr, POLICIES))}, "
            f"not {value!r}"
        )
    return value


def policy_rules() -> list[tuple[str, str]]:
    """``DJANGO_CELERY_FULLDBRESULT_RECOVER`` as (pattern, policy) pairs, validated."""
    setting = conf.PREFIX + "RECOVER"
    value = conf.get("RECOVER")
    if isinstance(value, Mapping):
        pairs: Iterable[Any] = value.items()
    elif isinstance(value, (list, tuple)):
        pairs = value
    else:
        raise ImproperlyConfigured(
            f"{setting} must be a dict or a sequence of (pattern, policy) pairs, not "
            f"{type(value).__name__}"
        )
    rules = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ImproperlyConfigured(f"{setting}: {pair!r} is not a (pattern, policy) pair")
        rules.append((pair[0], check_policy(pair[1], f"{setting}[{pair[0]!r}]")))
    return rules


def policy_for(app: Any, task_name: str | None) -> str:
    """The task's ``recover`` attribute, else the setting's first match, else "report"."""
    task = records.registered_task(app, task_name) if task_name else None
    own = getattr(task, "recover", None)
    if own is not None:
        return check_policy(own, f"{task_name}.recover")
    for pattern, policy in policy_rules():
        if task_name and fnmatch.fnmatchcase(task_name, pattern):
            return policy
    return DEFAULT_POLICY


def tracks_started(app: Any, task_name: str | None) -> bool:
    """Whether the task records STARTED before it runs: only then does RECEIVED mean it
    never started (without it a running task stays RECEIVED)."""
    task = records.registered_task(app, task_name) if task_name else None
    tracked = getattr(task, "track_started", None)
    return bool(app.conf.task_track_started if tracked is None else tracked)


# -- what is read, what came of it -----------------------------------------------------


class LostRow(TypedDict):
    """A row recovery acts on: what it needs to decide, and to tell a chord."""

    id: int
    task_id: str
    task: str
    status: str
    retries: int
    hostname: str | None
    replayable: bool
    group_id: str | None
    options: dict[str, Any] | None


LOST_COLUMNS = tuple(LostRow.__annotations__)


@dataclass
class RecoveryResult:
    """What a recovery did, by task id."""

    #: Requeued (due, unclaimed SCHEDULED) and forwarded (by us, else by a running sender).
    resent: list[str] = field(default_factory=list)
    #: Marked FAILURE (``WorkerLostError``).
    failed: list[str] = field(default_factory=list)
    #: Policy "report": left as they are.
    reported: list[str] = field(default_factory=list)
    #: To be resent but not replayable (secret, or arguments not stored): left as they are.
    not_replayable: list[str] = field(default_factory=list)
    #: Moved on since they were read (their worker, another recoverer): left alone.
    moved_on: list[str] = field(default_factory=list)
    #: ``scheduler.send_now``'s outcome per resent id ("not claimed": a sender took it).
    sends: dict[str, str] = field(default_factory=dict)

    OUTCOMES = ("resent", "failed", "reported", "not_replayable", "moved_on")

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.OUTCOMES}

    @property
    def acted(self) -> bool:
        return bool(self.resent or self.failed)

    def add(self, other: RecoveryResult) -> None:
        for name in self.OUTCOMES:
            getattr(self, name).extend(getattr(other, name))
        self.sends.update(other.sends)

    def summary(self, limit: int | None = LOGGED_IDS) -> str:
        """One line: each outcome's count and task ids (the first ``limit`` of each)."""
        parts = []
        for name in self.OUTCOMES:
            ids = getattr(self, name)
            if ids:
                shown = ", ".join(ids[:limit])
                more = f", ... {len(ids) - limit} more" if limit and len(ids) > limit else ""
                parts.append(f"{name.replace('_', ' ')} {len(ids)} [{shown}{more}]")
        return "; ".join(parts) or "nothing to recover"


# -- the guarded transitions -----------------------------------------------------------


def _rows(using: str) -> Any:
    return TaskResultMeta.objects.using(using)


def lost_rows(
    using: str | None,
    max_age: timedelta,
    acceptable_states: Iterable[str] | None = None,
    task_ids: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[LostRow]:
    """The recoverable rows (``recoverable(max_age)``), oldest change first (the first
    ``limit``)."""

    def read(alias: str) -> list[LostRow]:
        qs = _rows(alias).recoverable(max_age, acceptable_states)
        if task_ids is not None:
            qs = qs.filter(task_id__in=list(task_ids))
        qs = qs.order_by("date_modified").values(*LOST_COLUMNS)
        return list(qs[:limit] if limit is not None else qs)

    return db.run_with_reconnect(read, using)


def _transition(
    using: str | None,
    rows: Sequence[LostRow],
    max_age: timedelta,
    acceptable_states: Iterable[str] | None,
    change: Callable[[Any, uuid.UUID], int],
) -> list[LostRow]:
    """Apply ``change(queryset, marker)`` to the rows that are still as they were read
    (recoverable, same state, same attempt); the rows it changed.

    The guard is part of the UPDATE, so of two recoverers racing for a row one changes it
    and the other finds nothing. ``change`` leaves ``marker`` in ``scheduled_id`` so that
    the rows it changed can be read back; it is cleared before the transaction commits, so
    no sender ever sees it.
    """
    if not rows:
        return []
    read: dict[tuple[str, int], list[int]] = {}
    for row in rows:
        read.setdefault((row["status"], row["retries"]), []).append(row["id"])
    as_read = Q()
    for (status, retries), read_ids in read.items():
        as_read |= Q(id__in=read_ids, status=status, retries=retries)
    marker = uuid.uuid4()
    ids = [row["id"] for row in rows]

    def run(alias: str) -> list[LostRow]:
        # Building the queryset reads the live workers: before the transaction, whose first
        # statement is then the UPDATE (docs/design.md, "SQLite: transactions write first").
        still = _rows(alias).filter(id__in=ids).recoverable(max_age, acceptable_states)
        with transaction.atomic(using=alias):
            if not change(still.filter(as_read), marker):
                return []
            mine = _rows(alias).filter(id__in=ids).claimed(marker)
            changed_ids = set(mine.values_list("id", flat=True))
            mine.update(scheduled_id=None)
        return [row for row in rows if row["id"] in changed_ids]

    return db.run_with_reconnect(run, using)


def _note(action: str, by: str) -> dict[str, Any]:
    """The row's note (its ``meta``, shown by the admin) of what recovery did."""
    return {"recovered": {"action": action, "by": by, "at": timezone.now().isoformat()}}


@dataclass(frozen=True)
class Scope:
    """What a recovery acts with: the app, the age that makes a row lost (with the states
    that are never stale), the database, and who recovers (written in each row's note)."""

    app: Any
    max_age: timedelta
    using: str | None = None
    acceptable_states: Iterable[str] | None = None
    by: str = BY_SENDER

    def transition(self, rows: Sequence[LostRow], change: Callable[..., int]) -> list[LostRow]:
        return _transition(self.using, rows, self.max_age, self.acceptable_states, change)


def resend(scope: Scope, rows: Sequence[LostRow], sender: Any = None) -> RecoveryResult:
    """Send these lost rows again: each still recoverable, replayable row becomes a due,
    unclaimed SCHEDULED row (``requeue``: same id, same attempt), then is forwarded by
    ``scheduler.send_now`` (its message carries the forwarded header: the worker's
    receipt claim runs the attempt once). A row the broker refuses stays due for any
    sender. Rows that are not replayable are left alone (``not_replayable``). ``sender``: a
    ``scheduler.Sender`` the caller keeps open (a running sender's own), else one for this
    call."""
    result = RecoveryResult()
    replayable = [row for row in rows if row["replayable"]]
    result.not_replayable = [row["task_id"] for row in rows if not row["replayable"]]
    meta = _note("resent", scope.by)
    changed = scope.transition(replayable, lambda qs, marker: qs.requeue(marker=marker, meta=meta))
    result.resent = [row["task_id"] for row in changed]
    result.moved_on = _others(replayable, changed)
    if result.resent:
        result.sends = operations.send_now(
            scope.app, result.resent, using=scope.using, sender=sender
        )
    return result


def lost_reason(row: LostRow, by: str) -> str:
    return (
        f"worker lost: {row['hostname'] or 'its worker'} stopped (no heartbeat) while the "
        f"task was {row['status']}; recovered by {by}"
    )


def failure_columns(app: Any, task_name: str, reason: str) -> dict[str, Any]:
    """The FAILURE columns of a ``WorkerLostError(reason)``, encoded by the app's result
    backend as a worker's failure is (``AsyncResult.get()`` raises it)."""
    backend = app.backend
    if not isinstance(backend, DatabaseResultBackend):
        raise ImproperlyConfigured(
            f"recovering tasks needs this package's result backend, not {type(backend)!r}"
        )
    error = WorkerLostError(reason)
    encoded = backend._encode_result(backend.prepare_exception(error))
    if encryption.results_apply_to(task_name):
        encoded = serialization.seal_result(encoded)
    return {
        "result": encoded.data,
        "content_type": encoded.content_type,
        "content_encoding": encoded.content_encoding,
        "traceback": f"billiard.exceptions.WorkerLostError: {reason}",
    }


def mark_failed(scope: Scope, rows: Sequence[LostRow]) -> RecoveryResult:
    """Make these lost rows FAILURE with a ``WorkerLostError`` naming the lost worker and
    who recovered it; a chord header part then fails its chord (``chords.report_ended_parts``),
    as a worker's failure does."""
    result = RecoveryResult()
    groups: dict[tuple[str, str, str | None], list[LostRow]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["status"], row["hostname"]), []).append(row)
    changed: list[LostRow] = []
    for (task_name, _status, _hostname), group in groups.items():
        reason = lost_reason(group[0], scope.by)
        failure = {
            **failure_columns(scope.app, task_name, reason),
            "meta": _note("failed", scope.by),
        }
        done = scope.transition(
            group, lambda qs, marker, failure=failure: qs.mark_lost(failure, marker=marker)
        )
        chords.report_ended_parts(scope.app, done, FAILURE, WorkerLostError(reason))
        changed.extend(done)
    result.failed = [row["task_id"] for row in changed]
    result.moved_on = _others(rows, changed)
    return result


def _others(rows: Sequence[LostRow], changed: Sequence[LostRow]) -> list[str]:
    done = {row["id"] for row in changed}
    return [row["task_id"] for row in rows if row["id"] not in done]


# -- applying the policies -------------------------------------------------------------


def decide(app: Any, row: LostRow, override: str | None = None) -> str:
    """What to do with a lost row: ``override`` (an operator's choice) or its policy; a
    RECEIVED row of a task that tracks its start never started, so it is resent when it
    can be, whatever the policy."""
    if override is not None:
        return check_policy(override, "override")
    if row["status"] == RECEIVED and row["replayable"] and tracks_started(app, row["task"]):
        return RESEND
    return policy_for(app, row["task"])


def recover_stale(
    app: Any,
    using: str | None = None,
    max_age: timedelta | None = None,
    *,
    override: str | None = None,
    acceptable_states: Iterable[str] | None = None,
    by: str = BY_SENDER,
    sender: Any = None,
    limit: int | None = None,
) -> RecoveryResult:
    """Apply each lost row's policy (``override``: one action for all); what was done.

    ``max_age`` (default ``RECOVER_AFTER``) must be positive (``recoverable`` refuses
    anything else: a row just requeued or just taken would count as lost). One warning
    line names the task ids resent and failed (a pass that only reports logs at INFO).
    ``sender``: see ``resend``; ``limit``: at most this many rows per pass (a running
    sender: the rest on its next pass).
    """
    if max_age is None:
        max_age = recover_after()
        if max_age is None:
            raise ValueError("recover_stale needs a positive max_age (RECOVER_AFTER is 0: off)")
    rows = lost_rows(using, max_age, acceptable_states, limit=limit)
    plan: dict[str, list[LostRow]] = {RESEND: [], FAIL: [], REPORT: []}
    for row in rows:
        plan[decide(app, row, override)].append(row)
    result = RecoveryResult(reported=[row["task_id"] for row in plan[REPORT]])
    scope = Scope(app, max_age, using, acceptable_states, by)
    if plan[RESEND]:
        result.add(resend(scope, plan[RESEND], sender))
    if plan[FAIL]:
        result.add(mark_failed(scope, plan[FAIL]))
    if rows:
        level = logging.WARNING if result.acted else logging.INFO
        hosts = sorted({row["hostname"] or "?" for row in rows})
        logger.log(
            level,
            "stale tasks of lost workers (%s), by %s: %s",
            ", ".join(hosts),
            by,
            result.summary(),
        )
    return result


def recover_after() -> timedelta | None:
    """``RECOVER_AFTER`` as a delta; None when automatic recovery is off (0)."""
    seconds = float(conf.get("RECOVER_AFTER") or 0)
    return timedelta(seconds=seconds) if seconds > 0 else None
