"""What a task row holds, read from a published message or from a worker request.

Both sources produce the same column -> value mapping, so the publish record,
the worker's writes and (later) the scheduler all agree on what a faithful
re-send needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from kombu.serialization import registry as serializer_registry

from . import encryption, secrecy, serialization

logger = logging.getLogger(__name__)

#: Headers of Celery's message protocol 2; anything else is a custom header.
PROTOCOL_HEADERS = frozenset(
    {
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
        "periodic_task_name",
    }
)


def to_datetime(value: Any) -> datetime | None:
    """An ISO string or datetime, made to fit the project's ``USE_TZ``."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parsed = parse_datetime(value)
        if parsed is None:
            return None
        value = parsed
    if not isinstance(value, datetime):
        return None
    if settings.USE_TZ and timezone.is_naive(value):
        return timezone.make_aware(value, timezone.get_default_timezone())
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value, timezone.get_default_timezone())
    return value


def registered_task(app: Any, name: str) -> Any:
    """The task registered under ``name``, or None; never finalizes the app.

    ``app.tasks`` finalizes an app that is not finalized yet (or raises with
    ``autofinalize=False``): a publisher that only sends tasks by name must not pay for
    that. Before finalization the task is known by its name only (``SECRET_TASKS``
    patterns still apply).
    """
    return app.tasks.get(name) if app.finalized else None


def message_repr(value: Any, app: Any) -> str:
    """The repr Celery puts in a message for ``value`` (args or kwargs) when none is given."""
    from celery.utils.saferepr import saferepr

    maxsize = getattr(app.amqp, "argsrepr_maxsize", 1024)
    return saferepr(value, maxsize, maxlevels=app.conf.get("task_repr_maxlevels", 3))


def serializer_of(app: Any, task: Any = None, chosen: str | None = None) -> str:
    """The serializer a task message uses: the call's, the task's, else the app's."""
    return chosen or getattr(task, "serializer", None) or app.conf.task_serializer


def _storing_serializers(app: Any, task: Any, chosen: str | None) -> Iterator[str]:
    """The message's serializer (as far as it is known here), then every serializer the app
    accepts: a call is never stored with one the app would refuse to read. Lazily: the app's
    settings are read only when the first one cannot encode the call."""
    names = [serializer_of(app, task, chosen)]
    yield names[0]
    for accepted in app.conf.accept_content or ():
        name = serializer_registry.type_to_name.get(accepted, accepted)
        if name not in names:
            names.append(name)
            yield name


def call_columns(
    task_name: str,
    args: Any,
    kwargs: Any,
    argsrepr: Any,
    kwargsrepr: Any,
    task: Any,
    app: Any,
    serializer: str | None = None,
    *,
    secret: bool = False,
) -> dict[str, Any]:
    """The args/kwargs columns: stored exactly, or only as reprs for a ``secret`` call
    (whose reprs the caller has already made safe, ``secrecy``).

    ``serializer``: the message's (default: the task's, else the app's); arguments the JSON
    columns cannot hold are packed with it (``serialization.encode_packed``).
    """
    if secret:
        return {
            "argsrepr": serialization.text_safe(argsrepr),
            "kwargsrepr": serialization.text_safe(kwargsrepr),
            "replayable": False,
        }
    argsrepr, kwargsrepr = serialization.text_safe(argsrepr), serialization.text_safe(kwargsrepr)
    encrypt = encryption.applies_to(task_name)
    if encrypt:  # the message's reprs show the arguments: not kept beside the sealed call
        argsrepr, kwargsrepr = secrecy.hidden_repr(args), secrecy.hidden_repr(kwargs)
    # Most calls fit the JSON columns: no serializer is looked up for them.
    encoded = None if encrypt else serialization.encode_call_json(args, kwargs)
    for name in () if encoded is not None else _storing_serializers(app, task, serializer):
        try:
            encoded = serialization.encode_packed(args, kwargs, name, encrypt=encrypt)
            break
        except Exception:  # noqa: BLE001, S112 - the next serializer the app accepts
            continue
    if encoded is None:  # never lose the state over its arguments
        logger.warning(
            "arguments of %s cannot be stored with a serializer the app accepts; row kept "
            "without them (not replayable)",
            task_name,
        )
        return {"argsrepr": argsrepr, "kwargsrepr": kwargsrepr, "replayable": False}
    return {
        "args": encoded.args,
        "kwargs": encoded.kwargs,
        "packed_args": encoded.packed,
        "packed_args_content_type": encoded.packed_content_type,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "replayable": True,
    }


def _clean(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v not in (None, [], {}, "")}


def options_text(options: dict[str, Any]) -> str | None:
    """The options column as JSON text (None when empty or not encodable); the caller has
    taken secret arguments out of its signatures (``secrecy.hide_in_options``)."""
    options = _clean(options)
    if not options:
        return None
    return serialization.json_text_or_none(options)


def _time_limits(timelimit: Any) -> dict[str, Any]:
    hard, soft = (list(timelimit or ()) + [None, None])[:2]
    return {"time_limit": hard, "soft_time_limit": soft}


def from_message(
    app: Any,
    name: str,
    body: Any,
    headers: dict[str, Any],
    properties: dict[str, Any],
    exchange: str | None,
    routing_key: str | None,
    declare: Any,
) -> dict[str, Any]:
    """Row values for a message about to be published (protocol 2, or 1)."""
    if isinstance(body, dict):  # protocol 1: everything is in the body
        headers = {**body, "group": body.get("taskset")}
        args, kwargs = body.get("args"), body.get("kwargs")
        embed = {k: body.get(k) for k in ("callbacks", "errbacks", "chain", "chord")}
    else:
        args, kwargs, embed = body
        embed = embed or {}
    task = registered_task(app, name)
    custom_headers = {k: v for k, v in headers.items() if k not in PROTOCOL_HEADERS}
    queue = None
    for entity in declare or ():
        queue = getattr(entity, "name", None) or queue
        break
    options = {
        "link": embed.get("callbacks"),
        "link_error": embed.get("errbacks"),
        "chain": embed.get("chain"),
        "chord": embed.get("chord"),
        "shadow": headers.get("shadow"),
        "group_index": headers.get("group_index"),
        "headers": custom_headers,
        **_time_limits(headers.get("timelimit")),
    }
    secret = secrecy.is_secret(name, task, headers)
    argsrepr, kwargsrepr = headers.get("argsrepr"), headers.get("kwargsrepr")
    if secret:
        argsrepr, kwargsrepr = secrecy.stored_reprs(
            argsrepr,
            kwargsrepr,
            args,
            kwargs,
            secrecy.reprs_checked(headers.get(secrecy.SECRET_HEADER)),
        )
    call = call_columns(name, args, kwargs, argsrepr, kwargsrepr, task, app, secret=secret)
    hidden_options, hidden = secrecy.hide_in_options(options, app)
    if hidden:
        call["replayable"] = False
    now = timezone.now()
    return {
        "task_id": headers["id"],
        "task": name,
        **call,
        "options": options_text(hidden_options),
        "queue": queue or routing_key or None,
        "exchange": exchange or None,
        "routing_key": routing_key or None,
        "priority": properties.get("priority"),
        "parent_id": parent_of(headers.get("parent_id"), headers["id"]),
        "root_id": headers.get("root_id"),
        "group_id": headers.get("group"),
        "periodic_task_name": headers.get("periodic_task_name"),
        "eta": to_datetime(headers.get("eta")),
        "expires": to_datetime(headers.get("expires")),
        "retries": int(headers.get("retries") or 0),
        "date_submitted": now,
        "date_modified": now,
    }


def parent_of(parent_id: str | None, task_id: str | None) -> str | None:
    """A retry is sent from inside the task itself: it is not its own parent."""
    return None if parent_id == task_id else parent_id


def task_name_of(request: Any) -> str | None:
    """The task name on a worker Context or Request (``.task`` may be a Task there)."""
    for attr in ("task", "name", "task_name"):
        value = getattr(request, attr, None)
        if isinstance(value, str) and value:
            return value
        if value is not None and isinstance(getattr(value, "name", None), str):
            return value.name
    return None


def from_request(app: Any, request: Any) -> dict[str, Any]:
    """Row values a worker knows about the task it runs (everything but the state)."""
    name = task_name_of(request) or ""
    delivery_info = getattr(request, "delivery_info", None) or {}
    options = {
        "link": getattr(request, "callbacks", None),
        "link_error": getattr(request, "errbacks", None),
        "chain": getattr(request, "chain", None),
        "chord": getattr(request, "chord", None),
        "shadow": getattr(request, "shadow", None),
        "group_index": getattr(request, "group_index", None),
        **_time_limits(getattr(request, "timelimit", None)),
    }
    hidden_options, hidden = secrecy.hide_in_options(options, app)
    values = {
        "task": name,
        "options": options_text(hidden_options),
        "exchange": delivery_info.get("exchange") or None,
        "routing_key": delivery_info.get("routing_key") or None,
        "queue": delivery_info.get("routing_key") or None,
        "priority": delivery_info.get("priority"),
        "parent_id": parent_of(getattr(request, "parent_id", None), getattr(request, "id", None)),
        "root_id": getattr(request, "root_id", None),
        "group_id": getattr(request, "group", None),
        "periodic_task_name": getattr(request, "periodic_task_name", None),
        "hostname": getattr(request, "hostname", None),
        "eta": to_datetime(getattr(request, "eta", None)),
        "expires": to_datetime(getattr(request, "expires", None)),
    }
    if name and getattr(request, "args", None) is not None:
        args, kwargs = request.args, getattr(request, "kwargs", None)
        argsrepr, kwargsrepr = (
            getattr(request, "argsrepr", None),
            getattr(request, "kwargsrepr", None),
        )
        task = registered_task(app, name)
        mark = getattr(request, secrecy.SECRET_HEADER, None)
        checked = secrecy.reprs_checked(mark)
        secret = secrecy.is_secret(name, task, {secrecy.SECRET_HEADER: mark})
        if secret:
            argsrepr, kwargsrepr = secrecy.stored_reprs(argsrepr, kwargsrepr, args, kwargs, checked)
        values.update(
            call_columns(name, args, kwargs, argsrepr, kwargsrepr, task, app, secret=secret)
        )
    if hidden:
        values["replayable"] = False
    return values


#: A request attribute: ``(attempt, values)`` of ``from_request`` for that request's attempt
#: (task id, retries), computed once for all the attempt's writes.
ROW_VALUES = "fulldb_row_values"
#: A request attribute: the attempt whose row a write of this request has filled.
ROW_FILLED = "fulldb_row_filled"


def from_request_once(app: Any, request: Any, attempt: tuple[str, int | None]) -> dict[str, Any]:
    """``from_request`` of the attempt, computed (arguments encoded, secrecy decided) once per
    request object: a task's STARTED, progress and final writes share it."""
    cached = getattr(request, ROW_VALUES, None)
    if cached is not None and cached[0] == attempt:
        return cached[1]
    values = from_request(app, request)
    # A request object that takes no attributes: computed for each write.
    with contextlib.suppress(AttributeError):
        setattr(request, ROW_VALUES, (attempt, values))
    return values


#: A request attribute: the ``meta`` a running task keeps in its row, written with each of
#: its state writes (the Django tasks runner's ``workers``), beside the backend's children.
ROW_META = "fulldb_row_meta"


def request_retries(request: Any) -> int | None:
    retries = getattr(request, "retries", None)
    return None if retries is None else int(retries)
