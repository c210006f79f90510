"""What the scheduler reads and writes: a claimed row, a pass's outcome, the columns."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict

from celery import states
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone

from .. import receipt, serialization

#: ``send_task`` keywords that describe *how* to send now, not the task itself.
TRANSIENT_OPTIONS = frozenset(
    {
        "countdown",
        "eta",
        "producer",
        "connection",
        "router",
        "result_cls",
        "publisher",
        "task_type",
        "add_to_parent",
        "task_id",
        "retry",
        "retry_policy",
        "declare",
    }
)
#: Options kept in their own columns, not in ``options``.
COLUMN_OPTIONS = (
    "queue",
    "exchange",
    "routing_key",
    "priority",
    "root_id",
    "parent_id",
    "group_id",
    "retries",
    "expires",
)
#: A header on every forwarded message: a worker receiving it takes the attempt first
#: (``receipt``: a revoked row or a copy of a forward does not run).
FORWARDED_HEADER = receipt.FORWARDED_HEADER

#: Read with a claim (plain columns).
CLAIM_COLUMNS = (
    "id",
    "task_id",
    "task",
    "packed_args",
    "packed_args_content_type",
    "argsrepr",
    "kwargsrepr",
    "eta",
    *COLUMN_OPTIONS,
)
#: Read as text with a claim and decoded row by row (``publishing.call_of``): a corrupt
#: stored value fails its own row instead of the read of the whole batch.
JSON_CLAIM_COLUMNS = ("args", "kwargs", "options")


class ClaimedRow(TypedDict):
    """A row a sender holds: what it needs to publish the call again."""

    id: int
    task_id: str
    task: str
    packed_args: bytes | memoryview | None
    packed_args_content_type: str | None
    argsrepr: str | None
    kwargsrepr: str | None
    eta: datetime | None
    queue: str | None
    exchange: str | None
    routing_key: str | None
    priority: int | None
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    retries: int
    expires: datetime | None
    args_json: str | None
    kwargs_json: str | None
    options_json: str | None


def claimed_values(queryset: Any, *extra: str) -> list[ClaimedRow]:
    """The claim columns of ``queryset``'s rows; JSON columns as ``<name>_json`` text."""
    as_text = {f"{c}_json": Cast(c, output_field=TextField()) for c in JSON_CLAIM_COLUMNS}
    return list(queryset.values(*CLAIM_COLUMNS, *extra, **as_text))


@dataclass
class PassResult:
    """What one forwarding run did (counts of rows)."""

    claimed: int = 0
    sent: int = 0
    released: int = 0
    expired: int = 0
    failed: int = 0
    #: Claims of a dead sender taken back (``claims.reclaim``), forwarded again.
    reclaimed: int = 0

    def add(self, other: PassResult) -> None:
        for name in ("claimed", "sent", "released", "expired", "failed", "reclaimed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Published:
    """What the broker made of a claimed batch (row ids)."""

    token: uuid.UUID
    #: Confirmed: they become SCHEDULED_SENT (the worker that takes one whose result is
    #: ignored deletes it: ``receipt``).
    sent: list[int] = field(default_factory=list)
    #: Refused by the broker, or never published (it failed): released for a later pass.
    unsent: list[int] = field(default_factory=list)
    #: Rows that cannot be sent (undecodable) and why: recorded as FAILURE.
    failures: list[tuple[int, BaseException]] = field(default_factory=list)
    #: Published, but the broker's confirm never came: they stay claimed (reported stale).
    unconfirmed: list[int] = field(default_factory=list)

    @property
    def broker_failed(self) -> bool:
        return bool(self.unsent or self.unconfirmed)

    def outcome(self, claimed: int, released: int) -> PassResult:
        return PassResult(
            claimed=claimed,
            sent=len(self.sent),
            released=released,
            failed=len(self.failures),
        )


def exception_result(exc_type: str, exc_module: str, message: str) -> str:
    """A stored FAILURE/REVOKED result in Celery's JSON exception form."""
    return serialization.dumps(
        {"exc_type": exc_type, "exc_message": [message], "exc_module": exc_module}
    )


def revoked_columns(message: str) -> dict[str, Any]:
    """Column changes that make a waiting row REVOKED with ``TaskRevokedError(message)``."""
    now = timezone.now()
    return {
        "status": states.REVOKED,
        "result": exception_result("TaskRevokedError", "celery.exceptions", message),
        "content_type": serialization.JSON_CONTENT_TYPE,
        "content_encoding": "utf-8",
        "date_done": now,
        "date_modified": now,
    }


def failed_columns(error: BaseException) -> dict[str, Any]:
    """Column changes that make a claimed row FAILURE: it cannot be forwarded."""
    now = timezone.now()
    return {
        "status": states.FAILURE,
        "result": exception_result(
            type(error).__name__,
            type(error).__module__,
            f"cannot forward the scheduled task: {error}",
        ),
        "content_type": serialization.JSON_CONTENT_TYPE,
        "content_encoding": "utf-8",
        "traceback": f"cannot forward the scheduled task: {error!r}",
        "date_done": now,
        "date_modified": now,
    }
