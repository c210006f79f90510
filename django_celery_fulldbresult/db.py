"""The database connection the task table is written through.

By default every write and read of the task table goes through a connection
of our own per thread (registered under a hidden alias):

* it is in autocommit mode, so a PENDING row written while the caller sits in
  ``transaction.atomic()`` is committed at once (no worker waits on the
  caller's locks, and a rollback does not erase the record of a sent task);
* Celery's Django fixup closes every configured connection around each task
  unless ``CELERY_DB_REUSE_MAX`` is set; this one is not in ``DATABASES``, so
  a worker does not pay a new connection per stored result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.db.models.functions import Now

from . import conf

logger = logging.getLogger(__name__)

T = TypeVar("T")

HIDDEN_PREFIX = "__fulldbresult__"

_created_lock = threading.Lock()
_created: list[weakref.ref] = []


def task_db_alias() -> str:
    """The configured alias of the database that holds the task table."""
    return conf.database()


def write_alias() -> str:
    """The alias to use for task-table statements in this thread."""
    base = task_db_alias()
    if not conf.get("DEDICATED_CONNECTION"):
        return base
    hidden = HIDDEN_PREFIX + base
    try:
        getattr(connections._connections, hidden)
    except AttributeError:
        wrapper = connections.create_connection(base)
        setattr(connections._connections, hidden, wrapper)
        with _created_lock:
            _created.append(weakref.ref(wrapper))
    return hidden


def upsert(model, using: str, objs: list, unique_fields: list[str], update_fields: list[str]):
    """``bulk_create`` as one upsert statement on every backend.

    MySQL's ``ON DUPLICATE KEY UPDATE`` takes no conflict target, and Django
    refuses ``unique_fields`` there.
    """
    manager = model._default_manager.using(using)
    if connections[using].vendor == "mysql":
        return manager.bulk_create(objs, update_conflicts=True, update_fields=update_fields)
    return manager.bulk_create(
        objs, update_conflicts=True, unique_fields=unique_fields, update_fields=update_fields
    )


def compiled_where(queryset) -> tuple[str, list]:
    """The WHERE clause of ``queryset`` as SQL and parameters, for a raw statement that
    must select exactly the rows the queryset selects (columns are table-qualified)."""
    query = queryset.query
    sql, params = query.get_compiler(using=queryset.db).compile(query.where)
    return sql, list(params)


def close_quietly(using: str) -> None:
    """Close a connection, ignoring errors from a connection that is already broken."""
    conn = connections[using]
    try:
        conn.close()
    except DatabaseError:
        conn.connection = None


def run_with_reconnect(operation: Callable[[str], T], using: str | None = None) -> T:
    """Run ``operation(alias)``; after a connection-level error, retry once on a fresh connection.

    Only statements that are safe to repeat go through here (the upserts are
    idempotent under the precedence rules). Inside a transaction nothing is
    retried: the transaction is already lost and the caller must know.
    """
    using = using or write_alias()
    try:
        return operation(using)
    except (OperationalError, InterfaceError) as exc:
        if connections[using].in_atomic_block:
            raise
        logger.warning("task table: %s; retrying on a new connection", exc)
        close_quietly(using)
        return operation(using)


def close_all() -> None:
    """Close the dedicated connections of every thread (tests, process shutdown).

    Closes the driver connections directly: Django refuses to close a
    connection from another thread, and these threads may be gone already.
    """
    with _created_lock:
        wrappers = [ref() for ref in _created]
    for wrapper in wrappers:
        if wrapper is None or wrapper.connection is None:
            continue
        with contextlib.suppress(Exception):
            wrapper.connection.close()
        wrapper.connection = None


def _close_inherited_connections() -> None:
    """After fork: drop the parent's sockets without talking over them."""
    with _created_lock:
        wrappers = [ref() for ref in _created]
    for wrapper in wrappers:
        if wrapper is None or wrapper.connection is None:
            continue
        with contextlib.suppress(AttributeError, OSError, TypeError, ValueError):
            os.close(wrapper.connection.fileno())
        try:
            wrapper.close()
        except Exception:  # noqa: BLE001 - the socket is gone; only forget it
            wrapper.connection = None


_fork_handler_installed = False


def install_fork_handler() -> None:
    """Called once from ``AppConfig.ready``."""
    global _fork_handler_installed
    if not _fork_handler_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_close_inherited_connections)
        _fork_handler_installed = True


class DatabaseNow(Now):
    """The database's clock in the form the project stores datetimes.

    Django stores UTC on MySQL and SQLite when ``USE_TZ`` is on and local time
    when it is off; MySQL's CURRENT_TIMESTAMP follows the session time zone,
    so it is not used there.
    """

    def as_mysql(self, compiler, connection, **extra_context):
        template = "UTC_TIMESTAMP(6)" if settings.USE_TZ else "NOW(6)"
        return self.as_sql(compiler, connection, template=template, **extra_context)

    def as_sqlite(self, compiler, connection, **extra_context):
        modifier = "" if settings.USE_TZ else ", 'localtime'"
        template = f"STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'NOW'{modifier})"
        return self.as_sql(compiler, connection, template=template, **extra_context)
