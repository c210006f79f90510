"""The package's settings, read from Django settings at first use.

Every setting is ``DJANGO_CELERY_FULLDBRESULT_<NAME>``. A value is read once and then kept
until Django's ``setting_changed`` signal says one of them changed (``override_settings``,
``modify_settings``, pytest-django's ``settings`` fixture), as Django caches settings-derived
values of its own: every task write reads several, and Django answers a setting a project
leaves unset through an ``AttributeError``. Reading them through this module (and never at
import time) keeps those working. Assigning to ``django.conf.settings`` at run time is not
supported by Django and is not seen here; nor is ``del settings.X`` inside
``override_settings()``, which sends no signal: a test simulates an unset setting with
``override_settings(X=None)`` (``None`` means the default).
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

PREFIX = "DJANGO_CELERY_FULLDBRESULT_"

DEFAULTS: dict[str, Any] = {
    # Write a PENDING row when a task is published.
    "TRACK_PUBLISH": False,
    # ... from a thread of the process, many rows per statement, moments after apply_async
    # returns (False: in apply_async itself, one statement per call).
    "PUBLISH_WRITE_BEHIND": True,
    # Store results as plain JSON whatever the app's result serializer.
    "USE_JSON": False,
    # With USE_JSON, store {"value": str(value), "forced_json": true} for values JSON cannot hold.
    "FORCE_JSON": False,
    # Store real args/kwargs (False: only argsrepr/kwargsrepr, rows are not replayable).
    "STORE_ARGS": True,
    # Task names (fnmatch patterns) whose args/kwargs are never stored (secrecy.py).
    "SECRET_TASKS": (),
    # Store the result, traceback and exception message of secret tasks (False: only the
    # state and the exception type; AsyncResult.get() then returns None).
    "SECRET_RESULTS": True,
    # Fernet keys (encryption.py): the first encrypts, all decrypt. Empty: nothing encrypted.
    "ENCRYPTION_KEYS": (),
    # Task names (fnmatch patterns) whose stored calls are encrypted when keys are set.
    "ENCRYPTED_TASKS": ("*",),
    # ... and their results too.
    "ENCRYPT_RESULTS": False,
    # The database alias that holds the task table.
    "DATABASE": "default",
    # Use a connection of our own (autocommit, not closed by Celery's Django fixup).
    "DEDICATED_CONNECTION": True,
    # A DATABASES alias (of the task database, autocommit) to use as that connection; "" for
    # the package's built-in one (not in DATABASES: Celery's fixup would close it per task).
    "CONNECTION": "",
    # ... even in Django's test environment (default: there, the test's own connection, so
    # rows are part of each test's transaction; our own suite sets True).
    "DEDICATED_CONNECTION_IN_TESTS": False,
    # Seconds between worker heartbeats; 0 disables them (stale STARTED is then age-only).
    "WORKER_HEARTBEAT": 10.0,
    # Heartbeats missed before a worker counts as gone.
    "WORKER_HEARTBEAT_GRACE": 3,
    # Rows deleted per statement by the expiry cleanup.
    "CLEANUP_BATCH_SIZE": 5000,
    # Database ETA scheduler: hold eta/countdown tasks in the database.
    "SCHEDULE_ETA": False,
    # Intercept every app's send_task (apply_async, delay, signatures, retry) without code change.
    "MONKEY_PATCH_ASYNC": False,
    # Task names (fnmatch patterns) whose delay stays in the broker.
    "SCHEDULE_EXCLUDE": (),
    # Delays shorter than this many seconds stay in the broker.
    "SCHEDULE_MIN_DELAY": 0.0,
    # Transactional publish (outbox; needs SCHEDULE_ETA and the interception): a call made
    # inside transaction.atomic() on the task database is written in that transaction and
    # published after commit (scheduler/outbox.py). Per call: db_schedule="transaction" / True.
    "TRANSACTIONAL_PUBLISH": False,
    # ... its row is due this many seconds after the call: the on-commit hook publishes it
    # at once; a sender forwards it only if the hook never ran (the process died).
    "TRANSACTIONAL_PUBLISH_GRACE": 5.0,
    # Rows claimed and published per sender batch.
    "SCHEDULER_BATCH_SIZE": 500,
    # Longest sleep of run_scheduler between two polls, in seconds.
    "SCHEDULER_INTERVAL": 1.0,
    # AMQP publisher confirms for forwarded tasks: a row becomes SCHEDULED_SENT only once the
    # broker has the message. Confirms are awaited every SCHEDULER_CONFIRM_WINDOW messages.
    "SCHEDULER_CONFIRM_PUBLISH": True,
    "SCHEDULER_CONFIRM_WINDOW": 100,
    # Seconds to wait for the broker's confirms before leaving the rows claimed (reported).
    "SCHEDULER_CONFIRM_TIMEOUT": 30.0,
    # Seconds after which the claims of a sender that stopped renewing them (it died) are
    # taken back and forwarded again by any running sender; 0: never (an operator resends).
    # A live sender renews its claims every quarter of this.
    "SCHEDULER_RECLAIM_AFTER": 300.0,
    # Recovering the task of a lost worker (recovery.py): "resend", "fail" or "report" per
    # task name, as (fnmatch pattern, policy) pairs or a dict, first match wins; a task's own
    # ``recover`` attribute comes first; tasks matching none: "report".
    "RECOVER": (),
    # Seconds a RECEIVED/STARTED task of a gone worker waits before a running sender
    # (run_scheduler) applies its policy; 0: never (find_stale_tasks --resend/--mark-failed).
    "RECOVER_AFTER": 300.0,
    # Every task attempt (task id + retries) runs at most once while its worker lives: a
    # worker takes it in the row when it receives the message (receipt.py); copies of a
    # message (Redis/SQS visibility timeout, a duplicated publish) are acknowledged and not
    # run, and a REVOKED row is never run. Forwarded tasks always get this check.
    "RUN_ONCE": False,
    # AsyncResult.get(), join_native and the other ways of waiting for results wake when the
    # result is stored (PostgreSQL: LISTEN/NOTIFY, push/); False, or another database: polling.
    "RESULT_PUSH": True,
    # PostgreSQL (psycopg 3): the package's own connection sends its repeated statements (state
    # writes, publish records, receipts) prepared: parsed and planned once per session, then
    # only their parameters. False for a pooler that cannot hold them (PgBouncer in
    # transaction mode before 1.21); a database's OPTIONS "prepare_threshold" also wins.
    "PREPARED_STATEMENTS": True,
    # Admin (issue 4).
    "OVERRIDE_BEAT_ADMIN": False,
}

#: Old names still accepted: 0.5.x name -> current name.
ALIASES = {"OVERRIDE_DJCELERY_ADMIN": "OVERRIDE_BEAT_ADMIN"}


_read: dict[str, Any] = {}
_read_lock = threading.Lock()
#: Bumped by every ``forget``: a value read before it is not kept after it.
_generation = 0


def get(name: str) -> Any:
    """Return the setting ``DJANGO_CELERY_FULLDBRESULT_<name>`` or its default."""
    try:
        return _read[name]
    except KeyError:
        pass
    if name not in DEFAULTS:
        raise KeyError(f"unknown django-celery-fulldbresult setting {name!r}")
    generation = _generation
    value = _from_settings(name)
    with _read_lock:
        if generation == _generation:
            _read[name] = value
    return value


def _from_settings(name: str) -> Any:
    value = getattr(settings, PREFIX + name, None)
    if value is None:
        for old, new in ALIASES.items():
            if new == name:
                value = getattr(settings, PREFIX + old, None)
    return DEFAULTS[name] if value is None else value


def forget(*, setting: str, **kwargs: Any) -> None:
    """Read every setting again at its next use (``setting_changed``'s receiver)."""
    global _generation
    if not setting.startswith(PREFIX):
        return
    with _read_lock:
        _generation += 1
        _read.clear()


setting_changed.connect(forget, dispatch_uid="django_celery_fulldbresult.conf.forget")


def track_publish() -> bool:
    return bool(get("TRACK_PUBLISH"))


def use_json() -> bool:
    return bool(get("USE_JSON"))


def force_json() -> bool:
    return bool(get("FORCE_JSON"))


def database() -> str:
    return get("DATABASE")
