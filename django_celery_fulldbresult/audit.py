"""The audit trail of operator actions: Django admin's own ``LogEntry`` rows.

Every Retry, Cancel, Send now and Revoke records one entry per row it acted on (who,
when, which task, what happened, the copy's new id), and beat's Run now one per periodic
task; the admin's "History" page of each object shows them. One INSERT per action, however
many rows it touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType

#: LogEntry.object_repr's length.
REPR_LENGTH = 200


@dataclass(frozen=True)
class Entry:
    """What one action did to one object."""

    object_id: Any
    object_repr: str
    message: str


def record(request: Any, model: type, action: str, entries: Iterable[Entry]) -> int:
    """Write an entry per object, in one statement; the number written."""
    user_id = getattr(request.user, "pk", None)
    if user_id is None:
        return 0
    content_type = ContentType.objects.get_for_model(model, for_concrete_model=False)
    rows = [
        LogEntry(
            user_id=user_id,
            content_type_id=content_type.pk,
            object_id=str(entry.object_id),
            object_repr=entry.object_repr[:REPR_LENGTH],
            action_flag=CHANGE,
            change_message=f"{action}: {entry.message}",
        )
        for entry in entries
    ]
    LogEntry.objects.bulk_create(rows)
    return len(rows)
