"""The Celery result backend: ``CELERY_RESULT_BACKEND =
"django_celery_fulldbresult.result_backends:DatabaseResultBackend"``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import states
from celery.backends.base import BaseBackend
from celery.exceptions import ChordError
from celery.result import GroupResult, ResultBase, allow_join_result, result_from_tuple
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import F
from django.utils import timezone
from kombu.exceptions import EncodeError

from . import conf, db, records, serialization

logger = logging.getLogger(__name__)

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


class DatabaseResultBackend(BaseBackend):
    """Stores every state of every task, with what is needed to send it again."""

    subpolling_interval = 0.5
    supports_autoexpire = False
    supports_native_join = False

    # -- retry policy -------------------------------------------------------

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        # Every write is an idempotent upsert, so connection-level errors,
        # deadlocks and lock timeouts can be retried.
        return isinstance(exc, (OperationalError, InterfaceError))

    def on_backend_retryable_error(self, exc: BaseException) -> None:
        db.close_quietly(db.write_alias())

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

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        from .models import TaskResultMeta

        encoded = self._encode_result(result)
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
            "traceback": traceback,
            "meta": serialization.dumps({"children": children}) if children else None,
            "date_done": now if state in states.READY_STATES else None,
            "date_started": now if state == states.STARTED else None,
            "date_modified": now,
        }
        retries = None
        # update_state(task_id=other) passes the *current* request: only use a
        # request's metadata for its own task.
        if request is not None and getattr(request, "id", None) == task_id:
            values.update(records.from_request(self.app, request))
            retries = records.request_retries(request)

        db.run_with_reconnect(
            lambda using: TaskResultMeta.objects.store_state(values, using=using, retries=retries)
        )
        return result

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        from .models import TaskResultMeta

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

    def _forget(self, task_id: str) -> None:
        from .models import TaskResultMeta

        db.run_with_reconnect(
            lambda using: (
                TaskResultMeta.objects.using(using).filter(task_id=task_id)._raw_delete(using)
            )
        )

    # -- groups -------------------------------------------------------------

    def _save_group(self, group_id: str, result: GroupResult) -> GroupResult:
        from .models import GroupResultMeta

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
        from .models import GroupResultMeta

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
        from .models import GroupResultMeta

        db.run_with_reconnect(
            lambda using: (
                GroupResultMeta.objects.using(using).filter(group_id=group_id)._raw_delete(using)
            )
        )

    # -- chords: counted in the database, no chord_unlock polling -----------

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        from .models import ChordCounter

        self.ensure_chords_allowed()
        header_result = self.app.GroupResult(*header_result_args)
        header_result.save(backend=self)
        db.run_with_reconnect(
            lambda using: ChordCounter.objects.using(using).bulk_create(
                [ChordCounter(group_id=header_result.id)], ignore_conflicts=True
            )
        )

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        from .models import ChordCounter

        db.run_with_reconnect(
            lambda using: db.upsert(
                ChordCounter,
                using,
                [ChordCounter(group_id=group_id, total=chord_size)],
                unique_fields=["group_id"],
                update_fields=["total"],
            )
        )

    def _count_chord_part(self, group_id: str) -> tuple[int, int | None] | None:
        """Add one finished part; return (finished, total), or None if the chord is unknown.

        Not retried on error: an increment is not idempotent.
        """
        from .models import ChordCounter

        using = db.write_alias()
        with transaction.atomic(using=using):
            counters = ChordCounter.objects.using(using).filter(group_id=group_id)
            if not counters.update(count=F("count") + 1):
                return None
            # Same transaction: we read our own increment, and the row lock
            # taken by the UPDATE orders concurrent parts.
            return counters.values_list("count", "total").get()

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        from celery.canvas import maybe_signature

        from .models import ChordCounter

        group_id = getattr(request, "group", None)
        if not group_id or not getattr(request, "chord", None):
            return
        callback = maybe_signature(request.chord, app=self.app)
        counted = self._count_chord_part(group_id)
        if counted is None:
            return self.chord_error_from_stack(
                callback, ChordError(f"chord counter of group {group_id} no longer exists")
            )
        finished, total = counted
        deps = GroupResult.restore(group_id, backend=self)
        if deps is None:
            return self.chord_error_from_stack(
                callback, ChordError(f"GroupResult {group_id} no longer exists")
            )
        size = total or request.chord.get("chord_size") or len(deps)
        if finished < size:
            return None
        try:
            with allow_join_result():
                ret = deps.join(timeout=self.app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:  # noqa: BLE001 - reported to the chord's errbacks
            try:
                culprit = next(deps._failed_join_report())
                reason = f"Dependency {culprit.id} raised {exc!r}"
            except StopIteration:
                reason = repr(exc)
            logger.exception("Chord %r raised: %r", group_id, reason)
            self.chord_error_from_stack(callback, ChordError(reason))
        else:
            try:
                callback.delay(ret)
            except Exception as exc:  # noqa: BLE001
                logger.exception("Chord %r raised: %r", group_id, exc)
                self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))
        finally:
            deps.delete()
            db.run_with_reconnect(
                lambda using: (
                    ChordCounter.objects.using(using).filter(group_id=group_id)._raw_delete(using)
                )
            )
        return None

    # -- expiry -------------------------------------------------------------

    def cleanup(self) -> None:
        """``celery.backend_cleanup``: delete final rows older than ``result_expires``."""
        from .models import ChordCounter, GroupResultMeta, TaskResultMeta

        if not self.expires:
            return
        using = db.write_alias()
        batch = int(conf.get("CLEANUP_BATCH_SIZE"))
        tasks = TaskResultMeta.objects.delete_expired(self.expires, using=using, batch_size=batch)
        groups = GroupResultMeta.objects.delete_expired(self.expires, using=using, batch_size=batch)
        cutoff = timezone.now() - timedelta(seconds=self.expires)
        ChordCounter.objects.using(using).filter(date_created__lt=cutoff)._raw_delete(using)
        logger.info("backend cleanup: deleted %d task rows and %d group rows", tasks, groups)
