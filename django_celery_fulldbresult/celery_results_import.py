"""Importing django-celery-results' rows into the task table (``import_celery_results``).

What django-celery-results keeps, and what becomes of it here:

* ``task_args``/``task_kwargs`` hold Celery's *reprs* of the arguments (``argsrepr``), encoded
  with the result serializer: decoded, they become ``argsrepr``/``kwargsrepr``. The
  arguments themselves are unknown, so an imported row is never replayable (``replayable``
  False, ``options["imported_from"]`` says why: ``secrecy.refusal``).
* ``result``, ``content_type`` and ``content_encoding`` are stored alike (binary payloads as
  base64 text): they are copied as they are and decoded when read, with the app's accept
  list, exactly as the backend's own rows. Nothing is unpickled while importing unless the
  app accepts pickle; a repr or meta it cannot decode is kept as text in the row's meta.
* ``meta`` (the children, and what a task put in ``request.meta``) is decoded into ``meta``;
  ``meta["django_celery_results"]["id"]`` records the source row's primary key, which is
  how a restarted import finds where the last one stopped (``resume_point``).
* Secret tasks (``SECRET_TASKS``, ``STORE_ARGS = False``, ``store_args=False`` on a task
  registered in this process) keep no reprs; with ``SECRET_RESULTS = False`` no result or
  traceback either. Encrypted tasks keep no reprs (the backend keeps none beside a sealed
  call), and their results are sealed with ``ENCRYPT_RESULTS``.
* Rows are imported in the order of the source's primary key, a batch per transaction,
  inserted only where the task table has no row for the task id: a row of ours is newer or
  the same, and is never overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from celery import states
from celery.result import result_from_tuple
from celery.utils.saferepr import saferepr
from django.apps import apps
from django.db import DatabaseError, connections, router
from django.db.models import Max, Min
from django.utils import timezone
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import prepare_accept_content
from kombu.serialization import registry as serializer_registry
from kombu.utils import json as kombu_json

from . import db, encryption, records, rollups, secrecy, serialization
from .models import GroupResultMeta, TaskResultMeta

#: ``options["imported_from"]`` of an imported row (read by ``secrecy.refusal``).
SOURCE = "django-celery-results"
#: The key of ``meta`` that holds what is known of the source row.
META_KEY = "django_celery_results"
#: What ``argsrepr``/``kwargsrepr`` hold for a secret or encrypted task.
HIDDEN = "<arguments hidden>"
#: Task ids looked up per statement (within every database's limit on parameters).
LOOKUP_CHUNK = 500


class SourceUnavailable(Exception):
    """django-celery-results, or its tables, cannot be read (the message says what to do)."""


@dataclass(frozen=True)
class Source:
    """django-celery-results' models, and the database alias they are read from."""

    task_model: type
    group_model: type
    alias: str


def source(alias: str | None = None) -> Source:
    """django-celery-results' models on ``alias`` (default: where its router reads them)."""
    try:
        import django_celery_results  # noqa: F401 - only whether it is installed
    except ImportError:
        raise SourceUnavailable(
            "django-celery-results is not installed: pip install django-celery-results "
            "(the version that wrote the rows, 2.x), add 'django_celery_results' to "
            "INSTALLED_APPS and import again"
        ) from None
    if not apps.is_installed("django_celery_results"):
        raise SourceUnavailable(
            "'django_celery_results' is not in INSTALLED_APPS: keep it there until the import "
            "is done (its models are how the rows are read)"
        )
    task_model = apps.get_model("django_celery_results", "TaskResult")
    group_model = apps.get_model("django_celery_results", "GroupResult")
    alias = alias or router.db_for_read(task_model)
    if alias not in connections.settings:
        raise SourceUnavailable(f"--source-database {alias!r} is not an alias of DATABASES")
    try:
        tables = set(connections[alias].introspection.table_names())
    except DatabaseError as exc:
        raise SourceUnavailable(f"cannot read the database {alias!r}: {exc}") from exc
    missing = [
        m._meta.db_table for m in (task_model, group_model) if m._meta.db_table not in tables
    ]
    if missing:
        raise SourceUnavailable(
            f"the database {alias!r} has no table {', '.join(missing)}: it does not hold "
            "django-celery-results' rows (give the one that does with --source-database, or "
            "run manage.py migrate django_celery_results if it has never been migrated)"
        )
    return Source(task_model, group_model, alias)


def target_ready() -> str | None:
    """Why the task table cannot be written, or None."""
    alias = db.task_db_alias()
    tables = set(connections[alias].introspection.table_names())
    if TaskResultMeta._meta.db_table not in tables:
        return (
            f"the task table {TaskResultMeta._meta.db_table} is not in the database {alias!r}: "
            "run manage.py migrate django_celery_fulldbresult first"
        )
    return None


def result_accept(app: Any) -> set[str]:
    """What the app decodes results with: ``result_accept_content``, else ``accept_content``
    (Celery's rule for result backends)."""
    accept = app.conf.result_accept_content
    if accept is None:
        accept = app.conf.accept_content
    return prepare_accept_content(accept)


@dataclass
class Totals:
    """What an import did (or, dry, would do)."""

    read: int = 0
    imported: int = 0
    #: Task ids the task table had already: left as they are.
    present: int = 0
    #: ... of which ours is unfinished while django-celery-results' is final.
    present_unfinished: int = 0
    #: Imported rows with a repr or meta the app may not decode (kept as text in ``meta``).
    not_decoded: int = 0
    groups_read: int = 0
    groups_imported: int = 0
    groups_present: int = 0
    #: Groups whose result the app may not decode (pickle not accepted): not imported.
    groups_not_decoded: int = 0
    #: Imported task rows that got their group id from an imported group.
    members: int = 0
    last_id: int | None = None
    elapsed: float = 0.0


@dataclass
class Converter:
    """Builds our rows from django-celery-results' rows (no database access)."""

    app: Any
    accept: set[str]
    #: Task name -> (secret, call encrypted, result encrypted): settings read once per name.
    policies: dict[str, tuple[bool, bool, bool]] = field(default_factory=dict)

    @property
    def json_accepted(self) -> bool:
        return serialization.JSON_CONTENT_TYPE in self.accept

    def policy(self, name: str) -> tuple[bool, bool, bool]:
        """Whether ``name`` is secret, its calls encrypted, its results encrypted."""
        known = self.policies.get(name)
        if known is None:
            task = records.registered_task(self.app, name) if name else None
            secret = bool(name) and secrecy.is_secret(name, task)
            known = (secret, encryption.applies_to(name), encryption.results_apply_to(name))
            self.policies[name] = known
        return known

    def _decode(self, text: str | None, content_type: str, encoding: str) -> tuple[bool, Any]:
        """(decoded, value): the value, or (False, None) when the app may not decode it."""
        if text is None or text == "":
            return True, None
        if content_type == serialization.JSON_CONTENT_TYPE and self.json_accepted:
            return True, kombu_json.loads(text)  # what kombu's loads does, minus its lookups
        try:
            return True, serialization.decode_result(text, content_type, encoding, self.accept)
        except ContentDisallowed:
            return False, None

    def _repr(self, text: str | None, row: Any, undecoded: dict[str, Any], key: str) -> Any:
        """The argument repr django-celery-results stored (its own encoding undone)."""
        try:
            decoded, value = self._decode(text, row.content_type, row.content_encoding)
        except (DecodeError, ValueError, TypeError):
            return serialization.text_safe(text)  # older releases stored the repr as it was
        if not decoded:
            undecoded[key] = text
            return f"<not decoded: stored as {row.content_type}, not in accept_content>"
        if value is None or isinstance(value, str):
            return serialization.text_safe(value)
        return serialization.text_safe(saferepr(value, 1024))  # protocol 1: the values

    def _meta(self, row: Any, undecoded: dict[str, Any]) -> dict[str, Any]:
        try:
            decoded, value = self._decode(row.meta, row.content_type, row.content_encoding)
        except (DecodeError, ValueError, TypeError):
            decoded, value = False, None
        meta: dict[str, Any] = {}
        if not decoded:
            undecoded["meta"] = row.meta
        elif isinstance(value, dict):
            meta = {key: item for key, item in value.items() if key != META_KEY}
            if not meta.get("children"):
                meta.pop("children", None)
            if meta and serialization.json_text_or_none(meta) is None:
                undecoded["meta"], meta = row.meta, {}
        return meta

    def task(self, row: Any) -> tuple[TaskResultMeta, bool]:
        """Our row for one of django-celery-results', and whether all of it was decoded."""
        name = row.task_name or ""
        secret, encrypted_call, encrypted_result = self.policy(name)
        undecoded: dict[str, Any] = {}
        if secret or encrypted_call:
            argsrepr = kwargsrepr = HIDDEN if (row.task_args or row.task_kwargs) else None
        else:
            argsrepr = self._repr(row.task_args, row, undecoded, "task_args")
            kwargsrepr = self._repr(row.task_kwargs, row, undecoded, "task_kwargs")
        meta = self._meta(row, undecoded)
        source_info: dict[str, Any] = {"id": row.pk}
        if undecoded:
            source_info.update(
                undecoded=undecoded,
                content_type=row.content_type,
                content_encoding=row.content_encoding,
            )
        meta[META_KEY] = source_info
        result = serialization.EncodedResult(row.result, row.content_type, row.content_encoding)
        traceback = row.traceback
        if secret and secrecy.hide_outcome():
            result, traceback = self._hidden_outcome(row), None
        if result.data is not None and encrypted_result:
            result = serialization.seal_result(result)
        done = row.date_done if row.status in states.READY_STATES else None
        ours = TaskResultMeta(
            task_id=row.task_id,
            task=name,
            status=row.status,
            argsrepr=argsrepr,
            kwargsrepr=kwargsrepr,
            replayable=False,
            options={secrecy.IMPORTED_KEY: SOURCE},
            periodic_task_name=row.periodic_task_name,
            result=result.data,
            content_type=result.content_type,
            content_encoding=result.content_encoding,
            traceback=serialization.text_safe(traceback),
            meta=meta,
            hostname=row.worker,
            date_submitted=row.date_created,
            date_started=row.date_started,
            date_done=done,
            date_modified=row.date_done or row.date_created or timezone.now(),
        )
        return ours, not undecoded

    def _hidden_outcome(self, row: Any) -> serialization.EncodedResult:
        """``SECRET_RESULTS = False``: an exception keeps its type, nothing else is kept."""
        hidden = serialization.EncodedResult(None, row.content_type, row.content_encoding)
        if row.status not in states.EXCEPTION_STATES:
            return hidden
        try:
            decoded, value = self._decode(row.result, row.content_type, row.content_encoding)
        except (DecodeError, ValueError, TypeError):
            return hidden
        if not decoded or not isinstance(value, dict) or "exc_type" not in value:
            return hidden
        return serialization.encode_result_json(
            {**value, "exc_message": [secrecy.HIDDEN_MESSAGE]}, force=True
        )

    def group(self, row: Any) -> tuple[GroupResultMeta | None, list[str]]:
        """Our group row (the backend stores ``{"result": as_tuple()}``, django-celery-results
        the tuple itself) and its members' task ids; (None, []) when it may not be decoded."""
        try:
            decoded, value = self._decode(row.result, row.content_type, row.content_encoding)
        except (DecodeError, ValueError, TypeError):
            return None, []
        if not decoded or value is None:
            return None, []
        serializer = serializer_registry.type_to_name.get(row.content_type, "json")
        if serializer == "json":
            encoded = serialization.encode_result_json({"result": value}, force=False)
        else:
            encoded = serialization.encode_result({"result": value}, serializer)
        try:
            members = [part.id for part in result_from_tuple(value, self.app).results]
        except (TypeError, ValueError, IndexError, AttributeError):
            return None, []  # not a group's tuple
        ours = GroupResultMeta(
            group_id=row.group_id,
            result=encoded.data,
            content_type=encoded.content_type,
            content_encoding=encoded.content_encoding,
            date_done=row.date_done or row.date_created or timezone.now(),
        )
        return ours, members


# -- where a restarted import continues --------------------------------------------------


def _imported_id(task_id: str, using: str) -> int | None:
    meta = (
        TaskResultMeta.objects.using(using).filter(task_id=task_id).values_list("meta", flat=True)
    ).first()
    info = meta.get(META_KEY) if isinstance(meta, dict) else None
    return info.get("id") if isinstance(info, dict) else None


def resume_point(tasks: Any, using: str) -> int | None:
    """The primary key of the last source row an earlier import of ``tasks`` (the source's
    queryset, filters applied) wrote, or None to start from the first.

    Batches are written in primary-key order, one transaction each, so the imported rows
    are a prefix of ``tasks``: a binary search over the source's keys finds its end, each
    probe one indexed read on each side (a row of ours that records that source key). A
    task id that was already ours when it was imported counts as not imported: the search
    may then stop before the end, and the rows after it are read again (and skipped).
    """

    def first_from(key: int) -> tuple[int, str] | None:
        return tasks.filter(pk__gte=key).order_by("pk").values_list("pk", "task_id").first()

    def imported(found: tuple[int, str]) -> bool:
        return _imported_id(found[1], using) == found[0]

    bounds = tasks.aggregate(low=Min("pk"), high=Max("pk"))
    if bounds["low"] is None:
        return None
    # Every key up to ``low`` counts as imported, none from ``high`` on.
    low, high = bounds["low"] - 1, bounds["high"] + 1
    while high - low > 1:
        middle = (low + high) // 2
        found = first_from(middle)
        if found is not None and found[0] < high and imported(found):
            low = found[0]
        else:
            high = middle
    return None if low < bounds["low"] else low


# -- the import ----------------------------------------------------------------------------


def _present(task_ids: list[str], using: str) -> dict[str, str]:
    """task id -> state, for the ids the task table holds."""
    found: dict[str, str] = {}
    for start in range(0, len(task_ids), LOOKUP_CHUNK):
        chunk = task_ids[start : start + LOOKUP_CHUNK]
        found.update(
            TaskResultMeta.objects.using(using)
            .filter(task_id__in=chunk)
            .values_list("task_id", "status")
        )
    return found


def _insert(model: type, rows: list) -> None:
    """One transaction: ``rows`` inserted, those whose unique key exists skipped."""
    if rows:
        db.run_with_reconnect(partial(db.insert_all_absent, model, rows))


def batches(queryset: Any, after: int | None, size: int) -> Iterator[list]:
    """The rows of ``queryset`` after primary key ``after``, ``size`` per query (keyset
    pagination: every query starts at an index entry, whatever the table's size)."""
    while True:
        page = queryset.order_by("pk")
        if after is not None:
            page = page.filter(pk__gt=after)
        rows = list(page[:size])
        if not rows:
            return
        yield rows
        after = rows[-1].pk


def import_tasks(
    tasks: Any,
    converter: Converter,
    totals: Totals,
    *,
    after: int | None,
    batch_size: int,
    limit: int | None,
    dry_run: bool,
    progress: Callable[[Totals], None],
) -> bool:
    """Import ``tasks`` after key ``after``; True when every row was read (not ``limit``)."""
    started = time.monotonic()
    for rows in batches(tasks, after, batch_size if limit is None else min(batch_size, limit)):
        if limit is not None:
            rows = rows[: max(limit - totals.read, 0)]
        task_ids = [row.task_id for row in rows]
        present = db.run_with_reconnect(partial(_present, task_ids))
        converted = [converter.task(row) for row in rows if row.task_id not in present]
        new = [ours for ours, _complete in converted]
        if not dry_run:
            _insert(TaskResultMeta, new)
            if new:  # old results land in hours stats() may have counted already
                db.run_with_reconnect(rollups.forget)
        totals.read += len(rows)
        totals.imported += len(new)
        totals.present += len(rows) - len(new)
        totals.present_unfinished += sum(
            1
            for row in rows
            if row.task_id in present
            and row.status in states.READY_STATES
            and present[row.task_id] not in states.READY_STATES
        )
        totals.not_decoded += sum(1 for ours, complete in converted if not complete)
        totals.last_id = rows[-1].pk
        totals.elapsed = time.monotonic() - started
        progress(totals)
        if limit is not None and totals.read >= limit:
            return False
    return True


def import_groups(
    groups: Any, converter: Converter, totals: Totals, *, batch_size: int, dry_run: bool
) -> None:
    """Import the saved groups (all of them, every run: inserted where absent), and give the
    imported task rows of their members the group id django-celery-results does not keep
    on a task row."""
    for rows in batches(groups, None, batch_size):
        converted = [(row, *converter.group(row)) for row in rows]
        ids = [row.group_id for row in rows]
        present = db.run_with_reconnect(partial(_groups_present, ids))
        new = [ours for _row, ours, _members in converted if ours and ours.group_id not in present]
        totals.groups_read += len(rows)
        totals.groups_not_decoded += sum(1 for _row, ours, _members in converted if ours is None)
        totals.groups_present += sum(1 for row in rows if row.group_id in present)
        totals.groups_imported += len(new)
        if dry_run:
            continue
        _insert(GroupResultMeta, new)
        for row, _ours, members in converted:
            if members:
                totals.members += db.run_with_reconnect(partial(_set_group, row.group_id, members))


def _groups_present(group_ids: list[str], using: str) -> set[str]:
    return set(
        GroupResultMeta.objects.using(using)
        .filter(group_id__in=group_ids)
        .values_list("group_id", flat=True)
    )


def _set_group(group_id: str, members: list[str], using: str) -> int:
    """The group id on imported member rows that have none (never on a row of ours)."""
    updated = 0
    for start in range(0, len(members), LOOKUP_CHUNK):
        updated += (
            TaskResultMeta.objects.using(using)
            .filter(
                task_id__in=members[start : start + LOOKUP_CHUNK],
                group_id__isnull=True,
                options__imported_from=SOURCE,
            )
            .update(group_id=group_id)
        )
    return updated


def since_filter(queryset: Any, since: datetime | None) -> Any:
    return queryset if since is None else queryset.filter(date_done__gte=since)
