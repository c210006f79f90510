"""The publish side: a call with a future ``eta``/``countdown`` becomes a SCHEDULED row.

Through ``ScheduledTask`` (a task base class), or, for every call of one Celery app,
``install(app)`` (what ``MONKEY_PATCH_ASYNC`` does for the app configured from Django's
settings): that app's own ``send_task`` and ``control.revoke`` are wrapped, nothing else.

Transactions. By default the row is committed at once on the package's own connection,
whatever transaction the caller is in: like a message handed to the broker, a rollback of
the caller does not take it back, and a retry raised inside ``transaction.atomic()`` is
never lost. ``apply_async(..., db_schedule="transaction")`` binds one call to the caller's
transaction instead (a rollback then means the task is never sent); a retry is never
bound. ``db_schedule=False`` keeps one call's ETA in the broker.

Transactional publish. A bound call that is due at once (no eta, or a due one) is held
the same way: its row, due ``TRANSACTIONAL_PUBLISH_GRACE`` seconds later, is written in the
caller's transaction and published after commit (``outbox``). ``TRANSACTIONAL_PUBLISH``
makes ``"transaction"`` the default of every call made inside ``transaction.atomic()`` on
the task database; ``db_schedule=True`` then opts one call out (published, or its row
committed, at once), as ``db_schedule=False`` does (and keeps a delay in the broker).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from celery.app.backends import by_url
from celery.utils.time import maybe_make_aware
from django.db import connections
from django.utils import timezone

from .. import conf, db, records, secrecy
from ..models import TaskResultMeta
from ..result_backends import DatabaseResultBackend
from ..states import SCHEDULED
from . import revoke
from .rows import COLUMN_OPTIONS, TRANSIENT_OPTIONS

logger = logging.getLogger(__name__)

#: The per-call choice: ``apply_async(..., db_schedule=...)``.
OPTION = "db_schedule"
#: ``db_schedule="transaction"``: the row joins the caller's transaction.
IN_TRANSACTION = "transaction"
#: ``db_schedule=True``: not bound to the caller's transaction (the default without
#: ``TRANSACTIONAL_PUBLISH``).
AT_ONCE = True

_state = threading.local()


@contextlib.contextmanager
def forwarding() -> Iterator[None]:
    """While the sender publishes: no interception, no publish tracking."""
    previous = getattr(_state, "forwarding", False)
    _state.forwarding = True
    try:
        yield
    finally:
        _state.forwarding = previous


def is_forwarding() -> bool:
    return getattr(_state, "forwarding", False)


def as_aware(app: Any, value: Any) -> datetime | None:
    """An eta/expires value (datetime, ISO text, or relative seconds) as an aware time."""
    if value is None:
        return None
    if isinstance(value, str):
        value = records.to_datetime(value) if value else None
        if value is None:
            return None
    if isinstance(value, (int, float)):  # relative seconds (expires)
        return app.now() + timedelta(seconds=value)
    return maybe_make_aware(value, app.timezone)


def due_time(app: Any, countdown: Any, eta: Any) -> datetime | None:
    """The absolute time a call asks for (countdown wins over eta, as in Celery)."""
    if countdown:
        return app.now() + timedelta(seconds=float(countdown))
    return as_aware(app, eta)


def wants_scheduling(
    app: Any, name: str, task: Any = None, headers: dict[str, Any] | None = None
) -> bool:
    """Whether a task of this name may wait in the database at all."""
    if not may_wait(app, name, task):
        return False
    # Secret tasks would have to store their arguments to be forwarded later.
    return not secrecy.is_secret(name, task, headers)


def may_wait(app: Any, name: str, task: Any = None) -> bool:
    """``wants_scheduling`` but for secrecy (a secret call bound to a transaction is refused,
    not published at once)."""
    if not conf.get("SCHEDULE_ETA") or is_forwarding() or app.conf.task_always_eager:
        return False
    if name.startswith("celery."):  # chord_unlock and friends stay in the broker
        return False
    if task is not None and getattr(task, "db_schedule", True) is False:
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in conf.get("SCHEDULE_EXCLUDE"))


def choice(db_schedule: Any) -> Any:
    """The per-call choice, the setting's default when the call made none (None)."""
    if db_schedule is None:
        return IN_TRANSACTION if conf.get("TRANSACTIONAL_PUBLISH") else AT_ONCE
    return db_schedule


def in_callers_transaction() -> bool:
    """Inside ``transaction.atomic()`` on the task database, in sync code. A test case's own
    blocks (``TestCase`` wraps each test in two) do not count: a test sees what production
    would, outside a transaction of its own."""
    if db.in_event_loop():
        return False
    connection = connections[db.task_db_alias()]
    if not connection.in_atomic_block:
        return False
    return not all(getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def may_hold(app: Any, countdown: Any, eta: Any, db_schedule: Any) -> bool:
    """Cheap first test of ``maybe_schedule``: whether the call could become a row."""
    if db_schedule is False or not conf.get("SCHEDULE_ETA"):
        return False
    if countdown is not None or eta is not None:
        return True
    return choice(db_schedule) == IN_TRANSACTION and in_callers_transaction()


def maybe_schedule(
    app: Any,
    name: str,
    args: Any = None,
    kwargs: Any = None,
    countdown: Any = None,
    eta: Any = None,
    task_id: str | None = None,
    result_cls: Any = None,
    add_to_parent: bool = True,
    task_type: Any = None,
    db_schedule: Any = None,
    **options: Any,
) -> Any:
    """Save the call as a SCHEDULED row if it asks for a future time, or if it is bound to
    the caller's transaction (transactional publish); else return None (and the caller
    publishes it as Celery would).

    ``options`` are ``send_task``'s keywords. The returned ``AsyncResult`` has the task's
    own id and becomes ready when the forwarded task finishes. ``db_schedule``: see the
    module's docstring (None: the call made no choice).
    """
    if not may_hold(app, countdown, eta, db_schedule):
        return None
    task = task_type if task_type is not None else records.registered_task(app, name)
    if not may_wait(app, name, task):
        return None
    parent = app.current_worker_task
    retrying = parent is not None and task_id is not None and task_id == parent.request.id
    # A retry is never bound to a transaction; async code has none.
    in_transaction = (
        choice(db_schedule) == IN_TRANSACTION and not retrying and in_callers_transaction()
    )
    when = due_time(app, countdown, eta)
    min_delay = float(conf.get("SCHEDULE_MIN_DELAY"))
    if when is None or when <= app.now() + timedelta(seconds=min_delay):
        if not in_transaction:
            return None  # already due: publish at once
        # Held until commit: the on-commit hook publishes it at once, a sender after the
        # grace only if the hook never ran.
        when = app.now() + timedelta(seconds=float(conf.get("TRANSACTIONAL_PUBLISH_GRACE")))
        held = True
    else:
        held = False
    if secrecy.is_secret(name, task, options.get("headers")):
        if in_transaction:
            raise _cannot_hold(name, "a secret task's arguments are never stored")
        return None  # its arguments would have to be stored: the broker keeps the ETA
    if not in_transaction and _sqlite_in_transaction():
        # SQLite has one writer: a connection of our own would wait for the caller's commit.
        logger.info("scheduler: SQLite inside a transaction; the broker keeps this ETA")
        return None
    values = scheduled_row(app, name, args, kwargs, task, task_id, when, options)
    if values is None:
        if in_transaction:
            raise _cannot_hold(name, "the call cannot be stored exactly (see the log)")
        return None
    if in_transaction:
        # The guard of "rolled back, never sent": the caller's connection, in its transaction.
        _store(values, db.task_db_alias())
        if held:
            from .outbox import publish_after_commit  # outbox -> operations -> intercept

            publish_after_commit(app, values["task_id"], db.task_db_alias())
    else:
        # Committed at once on the package's own connection (in async code, the helper
        # thread's: the alias is resolved where the statement runs).
        db.outside_event_loop(lambda: db.run_with_reconnect(lambda using: _store(values, using)))
    result = (result_cls or app.AsyncResult)(values["task_id"])
    if add_to_parent and parent is not None:
        parent.add_trail(result)
    return result


class TransactionalPublishError(RuntimeError):
    """A call bound to the caller's transaction that cannot be stored to be published later
    (a secret task, a call that cannot be stored exactly)."""


def _cannot_hold(name: str, why: str) -> Exception:
    return TransactionalPublishError(
        f"{name}: cannot be published after the caller's commit: {why}. Pass "
        "db_schedule=True to publish it at once, or use Celery's delay_on_commit (published "
        "from memory after commit: lost if the process dies first)."
    )


def _sqlite_in_transaction() -> bool:
    """SQLite inside the caller's transaction, and a connection of our own to write with."""
    caller = connections[db.task_db_alias()]
    if caller.vendor != "sqlite" or not caller.in_atomic_block or db.in_event_loop():
        return False
    return db.uses_own_connection()


def _store(values: dict[str, Any], using: str) -> None:
    TaskResultMeta.objects.store_state(
        values, using=using, retries=values["retries"], replace_call=True
    )


def scheduled_row(
    app: Any,
    name: str,
    args: Any,
    kwargs: Any,
    task: Any,
    task_id: str | None,
    when: datetime,
    options: dict[str, Any],
) -> dict[str, Any] | None:
    """The SCHEDULED row of a call, or None (with a warning) when it cannot be held exactly:
    the caller then sends it with the broker's ETA, as Celery would."""
    options = {k: v for k, v in options.items() if k not in TRANSIENT_OPTIONS}
    if task is not None and hasattr(task, "_get_exec_options"):  # what apply_async merges
        defaults = {k: v for k, v in task._get_exec_options().items() if v is not None}
        options = {**defaults, **options}
    if options.get("ignore_result") is None:
        options["ignore_result"] = bool(
            task.ignore_result if task is not None else app.conf.task_ignore_result
        )
    parent = app.current_worker_task
    if parent is not None:
        options.setdefault("root_id", parent.request.root_id or parent.request.id)
        options.setdefault("parent_id", parent.request.id)
    task_id = task_id or str(uuid.uuid4())
    options.setdefault("root_id", task_id)
    routed = app.amqp.router.route(dict(options), name, args, kwargs, task)
    queue = routed.get("queue")
    exchange = options.get("exchange")
    call = records.call_columns(
        name,
        args,
        kwargs,
        # The reprs the message would have carried, so the forwarded message carries them.
        options.get("argsrepr") or records.message_repr(args or (), app),
        options.get("kwargsrepr") or records.message_repr(kwargs or {}, app),
        task,
        app,
        serializer=options.get("serializer"),
    )
    call_options = {k: v for k, v in options.items() if k not in COLUMN_OPTIONS and v is not None}
    # One walk of the callbacks: secret ones hidden, encrypted ones sealed.
    stored_options, hidden = secrecy.hide_in_options(call_options, app)
    if hidden:
        # A secret task in its link, chain or chord: forwarding needs its arguments.
        logger.info("%s: a secret task in its callbacks; sent with a broker ETA", name)
        return None
    options_text = records.options_text(stored_options)
    if not call.get("replayable") or (call_options and options_text is None):
        logger.warning("%s: the call cannot be stored exactly; sent with a broker ETA", name)
        return None
    now = timezone.now()
    return {
        "task_id": task_id,
        "task": name,
        "status": SCHEDULED,
        **call,
        "options": options_text,
        "queue": getattr(queue, "name", queue),
        "exchange": getattr(exchange, "name", exchange) or None,
        "routing_key": options.get("routing_key"),
        "priority": options.get("priority"),
        "root_id": options.get("root_id"),
        "parent_id": records.parent_of(options.get("parent_id"), task_id),
        "group_id": options.get("group_id"),
        "retries": int(options.get("retries") or 0),
        "eta": records.to_datetime(when),
        "expires": records.to_datetime(as_aware(app, options.get("expires"))),
        "date_submitted": now,
        "date_modified": now,
    }


# -- installing on an app ---------------------------------------------------------------


def install_configured_app(send_task: bool) -> Any:
    """``AppConfig.ready``: install on the current Celery app, the one configured from Django
    settings, if its result backend is this package's; that app, or None."""
    app = current_app._get_current_object()
    try:
        backend, _url = by_url(app.conf.result_backend, app.loader)
    except Exception:  # noqa: BLE001 - a backend that cannot be loaded is not ours
        return None
    if not (isinstance(backend, type) and issubclass(backend, DatabaseResultBackend)):
        return None
    install(app, send_task=send_task)
    return app


def install(app: Any, send_task: bool = True) -> None:
    """Make ``app``'s calls with a future eta/countdown wait in the database
    (``send_task``: every way of sending), and its ``control.revoke`` revoke rows that wait
    there. Only this app changes (its own attributes); idempotent; ``uninstall`` undoes it.
    """
    if send_task and "send_task" not in vars(app):
        original = app.send_task

        def scheduling_send_task(name, args=None, kwargs=None, **options):
            result = maybe_schedule(app, name, args, kwargs, **options)
            if result is not None:
                return result
            options.pop(OPTION, None)
            return original(name, args, kwargs, **options)

        scheduling_send_task.__wrapped__ = original  # type: ignore[attr-defined]
        app.send_task = scheduling_send_task
    revoke.wrap_control(app)


def uninstall(app: Any) -> None:
    vars(app).pop("send_task", None)
    revoke.unwrap_control(app)


def is_installed(app: Any) -> bool:
    return "send_task" in vars(app)


def strip_option(options: dict[str, Any]) -> Any:
    """Take the per-call ``db_schedule`` out of options bound for Celery (None: not given)."""
    return options.pop(OPTION, None)
