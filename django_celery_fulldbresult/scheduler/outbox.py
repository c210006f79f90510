"""Transactional publish (the outbox): published after the caller's commit, exactly once.

``intercept.maybe_schedule`` decides which calls join the caller's transaction and writes
their rows there (the SCHEDULED row a delayed call gets, due ``TRANSACTIONAL_PUBLISH_GRACE``
seconds after the call). This module publishes them once the transaction commits:

* at once, by a ``transaction.on_commit`` hook: the rows held by this thread's transaction
  are forwarded through ``operations.send_now``, claimed with a token as a sender claims,
  so each is published once whoever gets there first;
* if the process died between the commit and the hook (or the hook failed: broker down),
  by any sender (``run_scheduler``, the beat task ``send_scheduled_task``) once the row is
  due, after the grace. The grace only keeps the sender from racing the hook; the hook
  never waits for it.

A rollback removes the rows with the rest of the transaction and Django discards the hook
(a savepoint's rollback, the hooks registered inside it): never sent.

The hook's sender is one per process (its broker connection with confirms kept between
commits, as ``run_scheduler`` keeps its own), used by one hook at a time. Its statements run
in the committing thread, on that thread's connection of the package's (``db.write_alias``;
autocommit, and the caller's transaction has committed): no thread hop, which cost about
7 ms per commit on 2 busy cores.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any

from django.db import connections

from .. import db
from . import operations
from .intercept import TransactionalPublishError  # noqa: F401 - this module's error
from .sender import Sender

logger = logging.getLogger(__name__)

_local = threading.local()
_senders_lock = threading.Lock()
#: (app id, database alias) -> the hook's sender in this process.
_senders: dict[tuple[int, str], Sender] = {}
#: Senders inherited through fork: never used (their thread is gone) nor closed (their
#: sockets are the parent's).
_inherited: list[Sender] = []


def _pending() -> dict[tuple[Any, str], list[str]]:
    if not hasattr(_local, "pending"):
        _local.pending = {}
    return _local.pending


def publish_after_commit(app: Any, task_id: str, using: str) -> None:
    """The row of ``task_id`` was written in this thread's transaction on ``using``: publish
    it when that transaction commits (every row held by it, in one ``send_now``)."""
    connection = connections[using]
    pending = _pending()
    if not connection.run_on_commit:
        # No hook waits in this transaction: what is left was rolled back.
        pending.clear()
    pending.setdefault((app, using), []).append(task_id)
    connection.on_commit(partial(_publish_held, app, using))


def _publish_held(app: Any, using: str) -> None:
    """The on-commit hook: the first one of a transaction publishes every row it held."""
    task_ids = _pending().pop((app, using), None)
    if not task_ids:
        return  # an earlier hook of the same commit sent them
    try:
        outcomes = _send(app, task_ids, using)
    except Exception:  # noqa: BLE001 - committed: a sender forwards them after the grace
        logger.exception(
            "transactional publish: %d committed tasks could not be published now; a "
            "scheduler sender forwards them once due (%s)",
            len(task_ids),
            ", ".join(task_ids),
        )
        return
    unsent = [task_id for task_id, outcome in outcomes.items() if outcome != operations.SENT]
    if unsent:
        logger.info(
            "transactional publish: not published by the on-commit hook (a sender has it, or "
            "it forwards them once due): %s",
            ", ".join(f"{task_id} ({outcomes[task_id]})" for task_id in unsent),
        )


class InThisThread:
    """A sender's database runner (``sender.DatabaseThread``'s interface) that runs the
    statements here, on this thread's connection of the package's, reconnecting as every
    statement of the package does (``db.run_with_reconnect``)."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(self.run(fn, *args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed over as an executor would
            future.set_exception(exc)
        return future

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return db.run_with_reconnect(lambda _alias: fn(*args, **kwargs))

    def reconnect(self) -> None:
        db.close_quietly(db.write_alias())

    def close(self) -> None:
        """Nothing of its own: the connection is the thread's."""


def _sender(app: Any, using: str) -> Sender:
    """The process's hook sender for this app and database (``_senders_lock`` held)."""
    sender = _senders.get((id(app), using))
    if sender is None:
        # No thread of its own: the statements run in the committing thread, and a claim of
        # send_now lives for milliseconds (no lease to renew; one left by a process that died
        # is taken back as any dead sender's).
        sender = Sender(app, using, database=InThisThread())
        _senders[(id(app), using)] = sender
    # The alias of the calling thread's connection of ours (the same name in every thread).
    sender.using = db.write_alias() if using == db.task_db_alias() else using
    return sender


def _send(app: Any, task_ids: list[str], using: str) -> dict[str, str]:
    with _senders_lock:
        sender = _sender(app, using)
        try:
            return operations.send_now(app, task_ids, sender=sender)
        except Exception as exc:  # noqa: BLE001 - a connection kept idle may have died
            logger.warning("transactional publish: %r; retrying on new connections", exc)
            sender.reconnect()
            return operations.send_now(app, task_ids, sender=sender)


def close() -> None:
    """Close the hooks' senders: their broker connections (at exit; tests)."""
    with _senders_lock:
        senders = list(_senders.values())
        _senders.clear()
    for sender in senders:
        sender.publisher.close()


def _forget_after_fork() -> None:
    _inherited.extend(_senders.values())
    _senders.clear()
    global _senders_lock
    _senders_lock = threading.Lock()


atexit.register(close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
