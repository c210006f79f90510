"""The Celery result backend: ``CELERY_RESULT_BACKEND =
"django_celery_fulldbresult.result_backends:DatabaseResultBackend"``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from celery import states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import BaseBackend, SyncBackendMixin
from celery.canvas import maybe_signature
from celery.exceptions import ChordError, ImproperlyConfigured
from celery.result import GroupResult, ResultBase, allow_join_result, result_from_tuple
from celery.utils.time import get_exponential_backoff_interval
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import EncodeError

from . import chords, conf, db, encryption, push, receipt, records, secrecy, serialization
from .managers import FILLED_ONCE
from .models import GroupResultMeta, TaskResultMeta
from .push.consumer import ResultConsumer
from .states import REVOCABLE_STATES

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Columns read back for ``AsyncResult`` (never the packed payload unless needed).
META_COLUMNS = (
    "task_id",
    "status",
    "result",
    "content_type",
    "content_encoding",
    "traceback",
    "meta",
    "date_done",
    "date_started",
    "date_submitted",
    "task",
    "args",
    "kwargs",
    "packed_args",
    "packed_args_content_type",
    "hostname",
    "retries",
    "queue",
    "parent_id",
    "root_id",
    "group_id",
    "periodic_task_name",
)

#: Registrations of pending results between two prunings of the entries whose objects are
#: gone (``add_pending_result``).
PRUNE_PENDING_EVERY = 1000

#: Task ids read per statement by ``get_many`` (native join): within every database's
#: limit on parameters.
GET_MANY_BATCH = 500

E_COMPRESSION = """\
result_compression={0!r} is not supported by django-celery-fulldbresult: results are stored
as text that the admin shows and SQL can query. Compress in the database instead (PostgreSQL
compresses large values by itself; MySQL/MariaDB: ROW_FORMAT=COMPRESSED), and remove the
setting.
"""


class DatabaseResultBackend(AsyncBackendMixin, BaseBackend):
    """Stores every state of every task, with what is needed to send it again.

    Waiting for results: pushed on PostgreSQL (``push``: Celery's asynchronous result API,
    as the Redis backend's), polled elsewhere (Celery's synchronous one).
    """

    subpolling_interval = 0.5
    supports_autoexpire = False
    #: ``get_many``: a group or chord header is read in batches, not one query per task.
    supports_native_join = True
    #: ``result_failure_expires`` (Celery 5.7): FAILURE rows expire after their own period.
    supports_failure_expires = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        failure_expires = self.app.conf.get("result_failure_expires")
        self.failure_expires = (
            self.expires if failure_expires is None else self.prepare_expires(failure_expires)
        )
        self._pending_lock = threading.Lock()
        self._registrations = 0
        self.result_consumer = ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages
        )

    def prepare_compression(self, compression: str | None) -> None:
        """Celery 5.7 applies ``result_compression`` to stored results: refused here."""
        if compression:
            raise ImproperlyConfigured(E_COMPRESSION.format(compression))
        return None

    # -- retry policy -------------------------------------------------------

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        # Only a lost connection: every write is an idempotent upsert (chord parts count
        # once), but a lock or statement timeout would only wait on the same lock again.
        return db.on_statement_thread(lambda: db.is_connection_error(exc, db.write_alias()))

    def on_backend_retryable_error(self, exc: BaseException) -> None:
        db.on_statement_thread(lambda: db.close_quietly(db.write_alias()))

    def _retrying(self, operation: Callable[[str], T]) -> T:
        """Run an idempotent database operation under the backend's retry policy.

        ``result_backend_always_retry``, ``..._max_retries`` and the backoff settings, as
        Celery applies them to stores (on every Celery version this package supports), on
        top of ``run_with_reconnect``'s immediate retries after a lost connection.
        """
        retries = 0
        while True:
            try:
                return db.run_with_reconnect(operation)
            except Exception as exc:
                if not (self.always_retry and self.exception_safe_to_retry(exc)):
                    raise
                if retries >= self.max_retries:
                    raise
                retries += 1
                logger.warning("task table: %s; retry %d of %s", exc, retries, self.max_retries)
                self.on_backend_retryable_error(exc)
                self._sleep(
                    get_exponential_backoff_interval(
                        self.base_sleep_between_retries_ms,
                        retries,
                        self.max_sleep_between_retries_ms,
                        True,
                    )
                    / 1000
                )

    def as_uri(self, include_password: bool = False) -> str:
        return "django-celery-fulldbresult://"

    # -- encoding -----------------------------------------------------------

    def _result_serializer(self) -> str:
        return "json" if conf.use_json() else self.serializer

    def prepare_exception(self, exc: BaseException, serializer: str | None = None) -> Any:
        return super().prepare_exception(exc, serializer or self._result_serializer())

    def prepare_value(self, result: Any) -> Any:
        if isinstance(result, ResultBase) and self._result_serializer() != "pickle":
            return result.as_tuple()
        return super().prepare_value(result)

    def _encode_result(self, value: Any) -> serialization.EncodedResult:
        serializer = self._result_serializer()
        if serializer == "json":
            return serialization.encode_result_json(value, conf.force_json())
        try:
            return serialization.encode_result(value, serializer)
        except EncodeError:
            raise
        except Exception as exc:  # serializers raise their own errors
            raise EncodeError(str(exc)) from exc

    def _decode_row_result(self, row: dict[str, Any]) -> Any:
        return serialization.decode_result(
            row["result"], row["content_type"], row["content_encoding"], self.accept
        )

    # -- task state ---------------------------------------------------------

    def mark_as_revoked(
        self,
        task_id: Any,
        reason: str = "",
        request: Any = None,
        store_result: bool = True,
        state: str = states.REVOKED,
    ) -> None:
        # A copy of a message this worker did not run (``receipt``): Celery revokes it to
        # skip it; the row is the running or finished attempt's, and no chord counts it.
        if receipt.was_skipped(getattr(request, "id", None) or getattr(task_id, "id", task_id)):
            return
        super().mark_as_revoked(
            task_id, reason, request=request, store_result=store_result, state=state
        )

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        own_request = request is not None and getattr(request, "id", None) == task_id
        if own_request and secrecy.hide_outcome() and self._is_secret(request):
            result, traceback = self._hidden_outcome(result, state), None
        encoded = self._encode_result(result)
        if own_request and encryption.results_apply_to(records.task_name_of(request)):
            encoded = serialization.seal_result(encoded)
        now = timezone.now()
        # A retry is published from inside the task, so Celery lists the task as its own child.
        children = [
            child
            for child in self.current_task_children(request) or ()
            if not (isinstance(child, (list, tuple)) and child and child[0][0] == task_id)
        ]
        values: dict[str, Any] = {
            "task_id": task_id,
            "status": state,
            "result": encoded.data,
            "content_type": encoded.content_type,
            "content_encoding": encoded.content_encoding,
            "traceback": serialization.text_safe(traceback),
            "meta": _row_meta(request if own_request else None, children),
            "date_done": now if state in states.READY_STATES else None,
            "date_started": now if state == states.STARTED else None,
            "date_modified": now,
        }
        retries = attempt = None
        # update_state(task_id=other) passes the *current* request: only use a
        # request's metadata for its own task.
        if own_request:
            retries = records.request_retries(request)
            attempt = (task_id, retries)
            known = records.from_request_once(self.app, request, attempt)
            if getattr(request, records.ROW_FILLED, None) == attempt:
                known = {k: v for k, v in known.items() if k not in FILLED_ONCE}
            values.update(known)
        # A revoke from outside the worker running the task (AsyncResult.revoke(), the
        # control command) only ends a task that is still waiting (Celery 5.7's rule).
        only_over = REVOCABLE_STATES if state == states.REVOKED and not own_request else None

        db.run_with_reconnect(
            lambda using: TaskResultMeta.objects.store_state(
                values, using=using, retries=retries, only_over=only_over
            )
        )
        if attempt is not None:
            with contextlib.suppress(AttributeError):
                setattr(request, records.ROW_FILLED, attempt)
        return result

    def _is_secret(self, request: Any) -> bool:
        name = records.task_name_of(request)
        mark = getattr(request, secrecy.SECRET_HEADER, None)
        task = records.registered_task(self.app, name) if name else None
        return secrecy.is_secret(name, task, {secrecy.SECRET_HEADER: mark})

    def _hidden_outcome(self, result: Any, state: str) -> Any:
        """``SECRET_RESULTS = False``: a secret task's exception keeps its type, not its
        message (which may quote the arguments); any other result is not stored."""
        if state not in states.EXCEPTION_STATES:
            return None
        if isinstance(result, dict) and "exc_type" in result:  # as the JSON serializer has it
            return {**result, "exc_message": [secrecy.HIDDEN_MESSAGE]}
        if isinstance(result, BaseException):
            try:
                hidden = type(result)(secrecy.HIDDEN_MESSAGE)
            except Exception:  # noqa: BLE001 - an exception class with other arguments
                hidden = Exception(f"{type(result).__name__}: {secrecy.HIDDEN_MESSAGE}")
            return self.prepare_exception(hidden)
        return None

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        row = db.run_with_reconnect(
            lambda using: (
                TaskResultMeta.objects.using(using)
                .filter(task_id=task_id)
                .values(*META_COLUMNS)
                .first()
            )
        )
        if row is None:
            return {"status": states.PENDING, "result": None}
        return self._meta_from_row(row)

    def _meta_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = row["meta"] or {}
        args, kwargs = row["args"], row["kwargs"]
        if row["packed_args"] is not None:
            try:
                args, kwargs = serialization.decode_packed(
                    row["packed_args"],
                    row["packed_args_content_type"],
                    self.app.conf.accept_content,
                )
            except Exception:  # noqa: BLE001 - args are informative here, the state is not
                args = kwargs = None
        return self.meta_from_decoded(
            {
                "task_id": row["task_id"],
                "status": row["status"],
                "result": self._decode_row_result(row),
                "traceback": row["traceback"],
                "children": meta.get("children") or [],
                "date_done": row["date_done"],
                "date_started": row["date_started"],
                "date_submitted": row["date_submitted"],
                "name": row["task"] or None,
                "args": args,
                "kwargs": kwargs,
                "worker": row["hostname"],
                "retries": row["retries"],
                "queue": row["queue"],
                "parent_id": row["parent_id"],
                "root_id": row["root_id"],
                "group_id": row["group_id"],
                "periodic_task_name": row["periodic_task_name"],
            }
        )

    def task_result_exists(self, task_id: str) -> bool:
        """``AsyncResult.exists()`` (Celery 5.7): is there a row for this task?

        True for every recorded task, whatever its state (a publish-tracked PENDING row, a
        SCHEDULED one); one indexed statement that never decodes the result.
        """
        return self._retrying(
            lambda using: TaskResultMeta.objects.using(using).filter(task_id=task_id).exists()
        )

    def _forget(self, task_id: str) -> None:
        db.run_with_reconnect(
            lambda using: TaskResultMeta.objects.using(using).filter(task_id=task_id).delete()
        )

    # -- waiting ------------------------------------------------------------
    # Pushed (``push.enabled()``): AsyncBackendMixin's methods and the ResultConsumer.
    # Otherwise Celery's synchronous ones, polling ``wait_for`` and ``get_many`` below.

    @property
    def is_async(self) -> bool:
        return push.enabled()

    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True):
        """Registered weakly, whatever the caller asks: a result is waited for while its
        object lives (a ``get()``, a group's members while the group lives). Celery
        registers every member of every ``GroupResult`` built (``then()`` of its barrier), in
        workers too where nobody waits; held strongly they would never be let go. Entries
        whose objects are gone are pruned every ``PRUNE_PENDING_EVERY`` registrations."""
        if not self.is_async:
            return result
        with self._pending_lock:
            self._registrations += 1
            if self._registrations % PRUNE_PENDING_EVERY == 0:
                for mapping in self._pending_results:
                    for task_id, waiters in list(mapping.items()):
                        if not waiters:
                            mapping.pop(task_id, None)
            return super().add_pending_result(result, weak=True, start_drainer=start_drainer)

    def wait_for_pending(self, result: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.is_async:
            return SyncBackendMixin.wait_for_pending(self, result, *args, **kwargs)
        return super().wait_for_pending(result, *args, **kwargs)

    def iter_native(self, result: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        if not self.is_async:
            return SyncBackendMixin.iter_native(self, result, **kwargs)
        return self._iter_native_pushed(result, **kwargs)

    def _iter_native_pushed(
        self, result: Any, no_ack: bool = True, **kwargs: Any
    ) -> Iterator[tuple[str, Any]]:
        """AsyncBackendMixin's ``iter_native``, with ``get_many``'s promise kept: what is
        ready is handed over before a timeout is raised (and an empty group is no error)."""
        self._ensure_not_eager()
        bucket: deque = deque()
        for node in result.results:
            if not hasattr(node, "_cache") or node._cache:
                bucket.append(node)
            else:
                self._collect_into(node, bucket)

        def handed_over() -> Iterator[tuple[str, Any]]:
            while bucket:
                node = bucket.popleft()
                yield node.id, (node._cache if hasattr(node, "_cache") else node.children)

        try:
            for _ in self._wait_for_pending(result, no_ack=no_ack, **kwargs):
                yield from handed_over()
        except self.TimeoutError:
            yield from handed_over()
            raise
        yield from handed_over()

    def read_metas(
        self, task_ids: list[str], only: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """The rows of ``task_ids`` (those in one of the states ``only``, when given), one
        statement per ``GET_MANY_BATCH`` ids, as Celery's task metas."""
        rows: list[dict[str, Any]] = []
        for start in range(0, len(task_ids), GET_MANY_BATCH):
            batch = task_ids[start : start + GET_MANY_BATCH]

            def read(using: str, batch: list[str] = batch) -> list[dict[str, Any]]:
                found = TaskResultMeta.objects.using(using).filter(task_id__in=batch)
                if only is not None:
                    found = found.filter(status__in=sorted(only))
                return list(found.values(*META_COLUMNS))

            rows += self._retrying(read)
        return [self._meta_from_row(row) for row in rows]

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Poll until the task is ready.

        As Celery's reference backends do, ``on_interval`` runs after every read, including
        the one that finds the task ready: ``AsyncResult.get()`` passes a check that re-raises
        a failed parent's own error (a chord's failed header part) before the result's.
        """
        self._ensure_not_eager()
        elapsed = 0.0
        while True:
            meta = self.get_task_meta(task_id)
            if on_interval:
                on_interval()
            if meta["status"] in states.READY_STATES:
                return meta
            if timeout is not None and elapsed >= timeout:
                raise self.TimeoutError("The operation timed out.")
            nap = interval if timeout is None else min(interval, timeout - elapsed)
            time.sleep(nap)
            elapsed += nap

    def get_many(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Callable[[dict], Any] | None = None,
        on_interval: Callable[[], Any] | None = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset = states.READY_STATES,  # noqa: N803 - Celery's signature
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(task_id, meta)`` as tasks become ready: the native join of groups and
        chords, one statement per ``GET_MANY_BATCH`` unready ids and poll."""
        self._ensure_not_eager()
        interval = 0.5 if interval is None else interval
        waiting = set(task_ids)
        for task_id in list(waiting):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                waiting.discard(task_id)
                yield task_id, cached
        elapsed, iterations = 0.0, 0
        while waiting:
            for meta in self.read_metas(sorted(waiting), READY_STATES):
                waiting.discard(meta["task_id"])
                self._cache[meta["task_id"]] = meta
                if on_message is not None:
                    on_message(meta)
                yield meta["task_id"], meta
            if not waiting:
                return
            if timeout is not None and elapsed >= timeout:
                raise self.TimeoutError(f"Operation timed out ({timeout})")
            if on_interval:
                on_interval()
            nap = interval if timeout is None else min(interval, timeout - elapsed)
            time.sleep(nap)
            elapsed += nap
            iterations += 1
            if max_iterations and iterations >= max_iterations:
                return

    # -- groups -------------------------------------------------------------

    def _save_group(self, group_id: str, result: GroupResult) -> GroupResult:
        encoded = self._encode_result({"result": result.as_tuple()})
        row = GroupResultMeta(
            group_id=group_id,
            result=encoded.data,
            content_type=encoded.content_type,
            content_encoding=encoded.content_encoding,
            date_done=timezone.now(),
        )
        db.run_with_reconnect(
            lambda using: db.upsert(
                GroupResultMeta,
                using,
                [row],
                unique_fields=["group_id"],
                update_fields=["result", "content_type", "content_encoding", "date_done"],
            )
        )
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        row = db.run_with_reconnect(
            lambda using: (
                GroupResultMeta.objects.using(using)
                .filter(group_id=group_id)
                .values("result", "content_type", "content_encoding", "date_done")
                .first()
            )
        )
        if row is None:
            return None
        meta = self._decode_row_result(row)
        return {
            "result": result_from_tuple(meta["result"], self.app),
            "date_done": row["date_done"],
        }

    def _delete_group(self, group_id: str) -> None:
        db.run_with_reconnect(
            lambda using: GroupResultMeta.objects.using(using).filter(group_id=group_id).delete()
        )

    # -- chords: counted in the database (chords.py), no chord_unlock polling --

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        self.ensure_chords_allowed()
        header_result = self.app.GroupResult(*header_result_args)
        header_result.save(backend=self)
        self._retrying(partial(chords.start, header_result.id))

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        self._retrying(partial(chords.set_size, group_id, int(chord_size)))

    def add_to_chord(self, group_id: str, result: Any) -> None:
        """``Task.add_to_chord``: the chord waits for one more part, whose result the body
        receives after the header's."""

        def grow(using: str) -> None:
            with transaction.atomic(using=using):
                # The counter's row lock orders concurrent additions to the saved group.
                if not chords.grow(group_id, 1, using):
                    raise ChordError(f"chord {group_id} is unknown or finished: not added")
                # Our own read, not restore_group(): Celery's retries must not run inside
                # this transaction.
                header = self._restore_group(group_id)["result"]
                header.results.append(result)
                self._save_group(group_id, header)

        self._retrying(grow)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        """Count this header part once; the part that completes the chord sends its body.

        Counting runs under the retry policy of stores: it is idempotent (the same call
        repeated gives the same answer), so a part is never counted twice, and a lost
        connection at the last part does not leave the chord waiting.
        """
        group_id, task_id = getattr(request, "group", None), getattr(request, "id", None)
        if not group_id or not task_id or not getattr(request, "chord", None):
            return
        token = uuid.uuid4().hex
        count = partial(
            chords.count_part, group_id, task_id, getattr(request, "group_index", None), token
        )
        counted = self._retrying(partial(count, fallback_total=request.chord.get("chord_size")))
        if counted.progress is chords.Progress.WAITING and counted.total is None:
            # No size was recorded (set_chord_size never came): the header's own length.
            deps = self.restore_group(group_id, cache=False)
            if deps is not None:
                counted = self._retrying(partial(count, fallback_total=len(deps)))
        if counted.progress is chords.Progress.UNKNOWN:
            logger.warning("chord %s: no counter (not ours, or expired); part ignored", group_id)
        if counted.progress is not chords.Progress.CLAIMED:
            return
        callback = maybe_signature(request.chord, app=self.app)
        self._cache.pop(group_id, None)
        if not self._complete_chord(group_id, token, callback):
            logger.warning("chord %s: claim taken over; the body is left to its holder", group_id)
        elif not self._retrying(partial(chords.finish, group_id, token)):
            logger.warning("chord %s: claim taken over before it was marked done", group_id)

    def _complete_chord(self, group_id: str, token: str, callback: Any) -> bool:
        """Join the header (a statement per batch of parts), then send the body or fail it.

        False when another call took the claim over meanwhile (nothing was sent).
        """
        deps = None
        try:
            deps = self.restore_group(group_id, cache=False)
            if deps is None:
                raise ChordError(f"GroupResult {group_id} no longer exists")
            join = deps.join_native if deps.supports_native_join else deps.join
            with allow_join_result():
                values = join(timeout=self.app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:  # noqa: BLE001 - reported to the chord's errbacks
            reason = self._failed_part(deps, exc)
            logger.exception("Chord %r raised: %r", group_id, reason)
            error = exc if isinstance(exc, ChordError) else _chord_error(reason, exc)
            self.chord_error_from_stack(callback, error)
            return True
        if not self._retrying(partial(chords.renew, group_id, token)):
            return False
        try:
            callback.delay(values)
        except Exception as exc:  # noqa: BLE001 - reported to the chord's errbacks
            logger.exception("Chord %r raised: %r", group_id, exc)
            self.chord_error_from_stack(callback, _chord_error(f"Callback error: {exc!r}", exc))
        return True

    def _failed_part(self, deps: GroupResult | None, exc: BaseException) -> str:
        """Celery's reason text: which header part raised (the join cached its state)."""
        if isinstance(exc, ChordError) or deps is None:
            return repr(exc)
        for part in deps.results:
            meta = self._cache.get(part.id)
            if meta is not None and meta["status"] in states.PROPAGATE_STATES:
                return f"Dependency {part.id} raised {exc!r}"
        return repr(exc)

    # -- expiry -------------------------------------------------------------

    def cleanup(self) -> None:
        """``celery.backend_cleanup``: delete final rows older than ``result_expires``
        (FAILURE rows: ``result_failure_expires``), groups, and finished chords."""
        db.on_statement_thread(self._cleanup)

    def _cleanup(self) -> None:
        using = db.write_alias()
        batch = int(conf.get("CLEANUP_BATCH_SIZE"))
        periods: dict[float, list[str]] = {}
        for state, period in (
            (states.SUCCESS, self.expires),
            (states.REVOKED, self.expires),
            (states.FAILURE, self.failure_expires),
        ):
            if period:  # None or 0: never
                periods.setdefault(period, []).append(state)
        tasks = sum(
            TaskResultMeta.objects.delete_expired(
                period, using=using, batch_size=batch, states=expiring
            )
            for period, expiring in periods.items()
        )
        groups = 0
        if self.expires:
            groups = GroupResultMeta.objects.delete_expired(
                self.expires, using=using, batch_size=batch
            )
            chords.expire(timezone.now() - timedelta(seconds=self.expires), using)
        logger.info("backend cleanup: deleted %d task rows and %d group rows", tasks, groups)


def _chord_error(reason: str, cause: BaseException) -> ChordError:
    """Celery's chord error, keeping the part's exception as its cause (as 5.7 does)."""
    error = ChordError(reason)
    error.__cause__ = cause
    return error


def _row_meta(request: Any, children: list[Any]) -> str | None:
    """The ``meta`` column of a write: what the running task keeps there
    (``records.ROW_META`` on its request), and its children."""
    meta = dict(getattr(request, records.ROW_META, None) or {})
    if children:
        meta["children"] = children
    return serialization.dumps(meta) if meta else None
