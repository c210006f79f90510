"""The database connection the task table is written through.

By default every write and read of the task table goes through a connection
of our own per thread, except in Django's test environment (``uses_own_connection``).
It is a Django connection of the task database's settings (``connections.create_connection``,
so its ``OPTIONS``, a psycopg pool included, ``CONN_MAX_AGE`` and ``CONN_HEALTH_CHECKS``),
registered per thread with ``connections["__fulldbresult__<alias>"] = wrapper`` and
deliberately not in ``DATABASES``:

* it is in autocommit mode, so a PENDING row written while the caller sits in
  ``transaction.atomic()`` is committed at once (no worker waits on the
  caller's locks, and a rollback does not erase the record of a sent task);
* Celery's Django fixup closes every connection of ``connections.all()`` (the
  ``DATABASES`` aliases) around each task unless ``CELERY_DB_REUSE_MAX`` is set, and under
  prefork closes a pooled alias's pool too; an alias there would cost a worker a new
  connection per stored result. Django's rules are applied to it by ``recycle`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

from django.conf import settings
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction
from django.db.models.functions import Now
from django.utils.connection import ConnectionDoesNotExist

from . import conf
from .green import green_pool, on_statement_runner, statement_runner

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

HIDDEN_PREFIX = "__fulldbresult__"

_created_lock = threading.Lock()
_created: list[weakref.ref] = []


def task_db_alias() -> str:
    """The configured alias of the database that holds the task table."""
    return conf.database()


def in_test_environment() -> bool:
    """True between Django's ``setup_test_environment()`` and its teardown (the test runner,
    pytest-django): the documented ``django.core.mail.outbox`` exists only then."""
    return hasattr(mail, "outbox")


def uses_own_connection() -> bool:
    """Whether task-table statements go through the package's own connection.

    Not in Django's test environment (unless ``DEDICATED_CONNECTION_IN_TESTS``): a test's
    rows must be part of the test's transaction, visible to the test and gone after it, and
    a second connection would wait on the test's own locks and outlive the test database.
    """
    if not conf.get("DEDICATED_CONNECTION"):
        return False
    return bool(conf.get("DEDICATED_CONNECTION_IN_TESTS")) or not in_test_environment()


def configured_alias() -> str | None:
    """``DJANGO_CELERY_FULLDBRESULT_CONNECTION``: a ``DATABASES`` alias of the project's
    that the package uses as its own connection (Django manages it), or None (the built-in
    one). Checked at first use: it must be the task database, in autocommit, never wrapped
    in a request's transaction."""
    alias = conf.get("CONNECTION")
    if not alias:
        return None
    if alias not in _checked_aliases:
        _check_configured_alias(alias)
        _checked_aliases.add(alias)
    return alias


_checked_aliases: set[str] = set()
#: The settings that must match between the task database and a configured connection.
SAME_DATABASE = ("ENGINE", "NAME", "HOST", "PORT")


def _check_configured_alias(alias: str) -> None:
    if alias not in connections.settings:
        raise ImproperlyConfigured(
            f"DJANGO_CELERY_FULLDBRESULT_CONNECTION = {alias!r} is not an alias of DATABASES"
        )
    own, base = connections.settings[alias], connections.settings[task_db_alias()]
    different = [key for key in SAME_DATABASE if own.get(key) != base.get(key)]
    if different:
        raise ImproperlyConfigured(
            f"DJANGO_CELERY_FULLDBRESULT_CONNECTION = {alias!r} must reach the task database "
            f"{task_db_alias()!r}: {', '.join(different)} differ"
        )
    if own.get("ATOMIC_REQUESTS") or not own.get("AUTOCOMMIT", True):
        raise ImproperlyConfigured(
            f"DJANGO_CELERY_FULLDBRESULT_CONNECTION = {alias!r} must be in autocommit, "
            "without ATOMIC_REQUESTS: its writes commit at once, whatever the caller does"
        )


def own_alias() -> str:
    """The alias of this thread's connection of ours: the configured one, or the built-in."""
    return configured_alias() or HIDDEN_PREFIX + task_db_alias()


def is_own_alias(alias: str) -> bool:
    """The alias of the package's own connection (``write_alias``), not a Django one."""
    return alias.startswith(HIDDEN_PREFIX) or alias == configured_alias()


def write_alias() -> str:
    """The alias to use for task-table statements in this thread."""
    base = task_db_alias()
    if not uses_own_connection():
        return base
    configured = configured_alias()
    if configured:
        return configured  # Django's, per thread (the statement runner's under gevent)
    hidden = HIDDEN_PREFIX + base
    if green_pool() and not on_statement_runner():
        return hidden  # the statements run on the runner thread, which has the connection
    try:
        connections[hidden]  # this thread's, once created (the alias is not in DATABASES)
    except ConnectionDoesNotExist:
        wrapper = connections.create_connection(base)
        connections[hidden] = wrapper
        with _created_lock:
            _created.append(weakref.ref(wrapper))
    return hidden


#: psycopg prepares a statement the second time a session runs its text: a text run once
#: (a rare shape) costs no extra Parse.
PREPARE_THRESHOLD = 2
#: Attribute of a connection wrapper: (its driver connection, whether that one prepares).
_PREPARES = "_fulldbresult_prepares"


def statement_cursor(using: str) -> Any:
    """A cursor of ``connections[using]`` for the package's repeated statements (state writes,
    publish records, receipts): Django's cursor (its wrappers, query logging and error
    translation), whose statements the server parses and plans once per session on the
    package's own PostgreSQL connection (``prepares``). Anywhere else, Django's cursor as is.

    Django's psycopg cursors bind parameters client-side and never prepare: every state write
    would send its 2-4 KB text to be parsed and planned again (``bench/stores.py``: 1.3x the
    writes per second prepared)."""
    connection = connections[using]
    cursor = connection.cursor()
    # Where Django logs queries (DEBUG, CaptureQueriesContext), its text is read back from
    # the driver's cursor, which has none for a prepared execution: sent as text there.
    if not connection.queries_logged and prepares(connection, using):
        import psycopg  # the driver prepares() found

        cursor.cursor.close()
        cursor.cursor = psycopg.Cursor(connection.connection)  # server-side binding
    return cursor


def prepares(connection: Any, using: str) -> bool:
    """Whether ``connection`` (open, the one of alias ``using``) sends the package's
    statements prepared: PostgreSQL through psycopg 3, the package's own connection,
    ``PREPARED_STATEMENTS`` on, and no ``prepare_threshold`` in the database's ``OPTIONS`` (a
    project that set one, ``None`` for PgBouncer in transaction mode, decides). Decided once
    per driver connection."""
    raw = connection.connection
    known = connection.__dict__.get(_PREPARES)
    if known is not None and known[0] is raw:
        return known[1]
    enabled = (
        connection.vendor == "postgresql"
        and is_own_alias(using)
        and bool(conf.get("PREPARED_STATEMENTS"))
        and "prepare_threshold" not in connection.settings_dict.get("OPTIONS", {})
        and hasattr(raw, "prepare_threshold")  # psycopg 3 (psycopg2 has no such attribute)
    )
    if enabled and raw.prepare_threshold is None:
        # Only server-side-binding cursors prepare; Django's own cursors on this
        # connection bind client-side (unless the project chose server-side binding).
        raw.prepare_threshold = PREPARE_THRESHOLD
    setattr(connection, _PREPARES, (raw, enabled))
    return enabled


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


def insert_absent_sql(connection: Any, model: Any, fields: list, rows: int = 1) -> str:
    """An INSERT of ``rows`` rows of ``fields`` that skips those a unique constraint already
    holds: ``INSERT IGNORE`` (MySQL, whose ``ON DUPLICATE KEY UPDATE`` counts a no-op update
    as a row found), ``ON CONFLICT DO NOTHING`` elsewhere."""
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * rows)
    table = quote(model._meta.db_table)
    if connection.vendor == "mysql":
        return f"INSERT IGNORE INTO {table} ({columns}) VALUES {values}"
    return f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT DO NOTHING"


def insert_if_absent(model, using: str, values: dict[str, Any]) -> bool:
    """Insert one row unless a unique constraint already holds it; True when inserted."""
    connection = connections[using]
    fields = [model._meta.get_field(name) for name in values]
    params = [field.get_db_prep_save(values[field.name], connection=connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(insert_absent_sql(connection, model, fields), params)
        return cursor.rowcount == 1


#: Rows per INSERT statement of ``insert_all_absent`` (PostgreSQL, SQLite): one SQL text,
#: which psycopg keeps parsed, for every full statement.
ROWS_PER_INSERT = 20


def insert_all_absent(model: Any, objs: list, using: str) -> None:
    """Insert model instances, skipping those a unique constraint already holds, in one
    transaction: through ``executemany`` of one row on MySQL (MySQLdb sends it as multi-row
    statements), elsewhere statements of ``ROWS_PER_INSERT`` rows each, pipelined by
    psycopg's ``executemany``. (``bulk_create`` builds a new SQL text per statement, which
    costs more than the database's work here.) Columns no instance sets are left NULL."""
    connection = connections[using]
    fields = [
        f
        for f in model._meta.local_concrete_fields
        if not f.primary_key
        and (not f.null or any(getattr(obj, f.attname) is not None for obj in objs))
    ]
    params = [
        [f.get_db_prep_save(getattr(obj, f.attname), connection=connection) for f in fields]
        for obj in objs
    ]
    with transaction.atomic(using=using), connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.executemany(insert_absent_sql(connection, model, fields), params)
            return
        limit = connection.features.max_query_params or len(fields) * ROWS_PER_INSERT
        per = max(1, min(ROWS_PER_INSERT, limit // len(fields)))
        chunks = [sum(params[i : i + per], []) for i in range(0, len(params), per)]
        rest = chunks.pop() if len(chunks[-1]) < per * len(fields) else None
        if chunks:
            cursor.executemany(insert_absent_sql(connection, model, fields, per), chunks)
        if rest:
            last = insert_absent_sql(connection, model, fields, len(rest) // len(fields))
            cursor.execute(last, rest)


#: A write that changes nothing, to take SQLite's write lock (``writing_first``): on the
#: table every migrated database has.
SQLITE_TAKE_WRITE_LOCK = "UPDATE django_migrations SET app = app WHERE 0 = 1"


@contextlib.contextmanager
def writing_first(using: str) -> Iterator[None]:
    """``transaction.atomic(using)`` for a transaction that reads before it writes
    (Django's ``get_or_create``, ``update_or_create``).

    With Django's default (deferred) transactions SQLite refuses such a transaction's write
    at once ("database is locked"; the busy ``timeout`` is not consulted) when another
    connection committed after its first read, and workers commit results all the time. On
    SQLite its first statement therefore takes the write lock (waiting its turn, up to the
    ``timeout``); elsewhere row locks do the job and nothing is added.
    """
    with transaction.atomic(using=using):
        connection = connections[using]
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute(SQLITE_TAKE_WRITE_LOCK)
        yield


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


#: PostgreSQL SQLSTATEs that mean the session is gone: class 08 (connection exception) and
#: the server ending it (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now).
PG_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03")
#: MySQL/MariaDB error numbers of a lost or refused connection (client 2002/2003/2006/2013/2055,
#: server 1053 shutdown in progress, 1927 connection killed, 4031 idle client disconnected).
MYSQL_CONNECTION_ERRORS = frozenset({1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031})
#: Connection-level failures retried by ``run_with_reconnect``, each on a new connection.
RECONNECT_ATTEMPTS = 2
#: A deadlock victim: the server rolled its statement (or transaction) back whole, so it is
#: run again at once, at most this many times (MySQL's advice for every deadlock).
DEADLOCK_ATTEMPTS = 3
#: Deadlock codes: PostgreSQL's SQLSTATE 40P01, MySQL/MariaDB's ER_LOCK_DEADLOCK (1213).
PG_DEADLOCK_STATE = "40P01"
MYSQL_DEADLOCK_ERROR = 1213


def is_connection_error(exc: BaseException, using: str | None = None) -> bool:
    """True when ``exc`` means the connection itself was lost or refused.

    Lock and statement timeouts, serialization failures and SQLite's "database is locked"
    are not: repeating the statement would wait again on the same lock, so they go to the
    caller (a deadlock victim is run again by ``run_with_reconnect``: see ``is_deadlock``).
    Decided by the driver's error code (SQLSTATE, MySQL errno); an error without one counts
    when the connection no longer answers (``is_usable()``).
    """
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if state:
        return str(state).startswith(PG_CONNECTION_STATES)
    code = cause.args[0] if cause.args and isinstance(cause.args[0], int) else None
    if code is not None:
        return code in MYSQL_CONNECTION_ERRORS
    if using is None:
        return isinstance(exc, InterfaceError)
    connection = connections[using]
    if connection.connection is None:
        return True
    try:
        return not connection.is_usable()
    except Exception:  # noqa: BLE001 - a connection that cannot even be asked is lost
        return True


def own_connection() -> Any | None:
    """This thread's connection of ours, when it exists (never creates one)."""
    if not uses_own_connection():
        return None
    try:
        return connections[own_alias()]
    except ConnectionDoesNotExist:
        return None


def recycle(between_tasks: bool) -> None:
    """Django's rules for a connection kept between requests, applied to this thread's
    connection of ours (``close_if_unusable_or_obsolete``: ``CONN_MAX_AGE``, a connection
    left broken by an error, and the next use health-checked with ``CONN_HEALTH_CHECKS``).

    Called when a web request ends (as Django's ``close_old_connections``: a publishing
    web thread keeps no session beyond what its ``CONN_MAX_AGE`` allows) and when a task
    ends in a worker (``between_tasks``). There ``CONN_MAX_AGE = 0`` keeps the connection
    (only a broken one is dropped): Django's "a connection per request" would be a new
    connection per task, which is what the package's own connection exists to avoid.
    """
    connection = own_connection()
    if connection is None or connection.connection is None:
        return
    if between_tasks and connection.settings_dict.get("CONN_MAX_AGE") == 0:
        if connection.errors_occurred and not connection.is_usable():
            close_quietly(own_alias())
        return
    connection.close_if_unusable_or_obsolete()


def close_idle() -> None:
    """A thread of ours with nothing to do (the publish writer): with ``CONN_MAX_AGE = 0``
    its connection is closed, as Django closes a request's; otherwise Django's rules."""
    connection = own_connection()
    if connection is None or connection.connection is None:
        return
    if connection.settings_dict.get("CONN_MAX_AGE") == 0:
        close_quietly(own_alias())
    else:
        connection.close_if_unusable_or_obsolete()


def on_request_finished(**_: Any) -> None:
    """The end of a web request: this thread's connection of ours, and the helper thread's
    (async views write through it, ``outside_event_loop``), follow Django's rules."""
    recycle(between_tasks=False)
    with _helper_lock:
        helper = _helper
    if helper is not None:
        helper.submit(recycle, False)  # on the thread that owns it; nobody waits


def on_task_postrun(**_: Any) -> None:
    on_statement_thread(lambda: recycle(between_tasks=True))


def is_deadlock(exc: BaseException) -> bool:
    """True when the server chose ``exc``'s statement as a deadlock victim and rolled back
    its transaction (unlike a lock timeout, which leaves the other side holding the lock)."""
    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if state:
        return str(state) == PG_DEADLOCK_STATE
    return bool(cause.args) and cause.args[0] == MYSQL_DEADLOCK_ERROR


def run_with_reconnect(operation: Callable[[str], T], using: str | None = None) -> T:
    """See ``_run_with_reconnect``; under gevent and eventlet on the statement runner."""
    return on_statement_thread(lambda: _run_with_reconnect(operation, using))


def retry_deadlocks(
    operation: Callable[Concatenate[str, P], T],
) -> Callable[Concatenate[str, P], T]:
    """``operation(using, ...)``, run again at once when the server chose it as a deadlock
    victim (``is_deadlock``: its statement or transaction was rolled back whole), at most
    ``DEADLOCK_ATTEMPTS`` times: MySQL's advice for every deadlock.

    For an operation that is one statement, or one transaction of its own, and safe to
    repeat. Inside a caller's transaction nothing is retried: the transaction is lost whole
    and the caller must know.
    """

    @functools.wraps(operation)
    def run(using: str, /, *args: P.args, **kwargs: P.kwargs) -> T:
        deadlocks = 0
        while True:
            try:
                return operation(using, *args, **kwargs)
            except OperationalError as exc:
                if (
                    not is_deadlock(exc)
                    or deadlocks >= DEADLOCK_ATTEMPTS
                    or connections[using].in_atomic_block
                ):
                    raise
                deadlocks += 1
                logger.info("task table: deadlock victim, running it again: %s", exc)

    return run


def _run_with_reconnect(operation: Callable[[str], T], using: str | None) -> T:
    """Run ``operation(alias)``; after a lost connection, run it again on a new one.

    Only statements that are safe to repeat go through here (the upserts are idempotent
    under the precedence rules, chord parts are counted once). At most
    ``RECONNECT_ATTEMPTS`` retries for connection-level errors (``is_connection_error``);
    a deadlock victim is run again at once on the same connection (``retry_deadlocks``); a
    lock or statement timeout is raised at once. Inside a caller's transaction nothing is
    retried: the transaction is already lost and the caller must know.
    """
    if using is None or is_own_alias(using):
        using = write_alias()  # this thread's own connection, created on first use
    rerun = retry_deadlocks(operation)
    attempt = 0
    while True:
        try:
            return rerun(using)
        except (OperationalError, InterfaceError) as exc:
            if connections[using].in_atomic_block or not is_connection_error(exc, using):
                raise
            close_quietly(using)  # the next statement, here or the caller's, reconnects
            if attempt >= RECONNECT_ATTEMPTS:
                raise
            attempt += 1
            logger.warning("task table: %s; retrying on a new connection", exc)


def in_event_loop() -> bool:
    """True in a thread running an asyncio event loop (an async view, ``asyncio.run``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_helper_lock = threading.Lock()
_helper: ThreadPoolExecutor | None = None


def on_statement_thread(operation: Callable[[], T]) -> T:
    """Run ``operation()`` (task-table statements) where its connection lives.

    In a gevent or eventlet worker, on the process's one statement runner (a real OS
    thread, one connection): Django's connections are per greenlet there, so a connection
    of our own per greenlet would be one per task, never reused. In an event loop's thread,
    on the helper thread (``outside_event_loop``). Anywhere else, here.
    """
    if green_pool() and not on_statement_runner():
        return statement_runner().call(operation)
    return outside_event_loop(operation)


def outside_event_loop(operation: Callable[[], T]) -> T:
    """Run ``operation()``; in an event loop's thread, on the package's helper thread.

    Django refuses database calls in a thread that runs an event loop
    (``SynchronousOnlyOperation``), yet ``apply_async`` is a blocking call that async code
    makes all the time (publishing is blocking network I/O too). The helper is one thread
    with its own connection, as ``asgiref.sync_to_async(thread_sensitive=True)`` would use;
    the caller waits for it, exactly as it waits for the broker.
    """
    global _helper
    if not in_event_loop():
        return operation()
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulldb-sync")
        helper = _helper
    return helper.submit(operation).result()


#: Other sessions of the package's that ``close_all`` closes too (result push's listener).
_also_close: list[Callable[[], None]] = []


def also_close(close: Callable[[], None]) -> None:
    """Have ``close_all`` call ``close`` (a module with sessions of its own registers)."""
    if close not in _also_close:
        _also_close.append(close)


def close_all() -> None:
    """Close the dedicated connections of every thread (tests, process shutdown).

    Closes the driver connections directly: Django refuses to close a
    connection from another thread, and these threads may be gone already.
    """
    for close in _also_close:
        close()
    with _created_lock:
        wrappers = [ref() for ref in _created]
    for wrapper in wrappers:
        if wrapper is None or wrapper.connection is None:
            continue
        with contextlib.suppress(Exception):
            wrapper.connection.close()
        wrapper.connection = None


def _close_inherited_connections() -> None:
    """After fork: drop the parent's sockets without talking over them (and the helper
    thread, which the child does not have)."""
    global _helper
    _helper = None
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
