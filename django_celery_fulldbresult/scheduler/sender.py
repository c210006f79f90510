"""The sender: claim due rows, publish them, record what became of each, batch after batch.

A ``Sender`` owns a database thread (its own connection: claims and records never join a
caller's transaction), a ``Publisher`` (its own broker connection, with confirms) and a
ledger of batches it could not record. ``run_scheduler`` keeps one for its whole life, so
its connections are opened once and reopened only after an error; ``forward_due`` (the beat
task, the tests) uses one for a single run.

The database work overlaps publishing: while batch N is published, batch N+1 is claimed
and batch N-1 recorded (docs/design.md, "Pipelining").
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import connections
from django.db.transaction import TransactionManagementError

from .. import conf, db
from . import claims, revoke
from .publishing import Publisher
from .rows import ClaimedRow, PassResult, Published

logger = logging.getLogger(__name__)


@dataclass
class Unsettled:
    """A batch whose claim or record may not have reached the database (it was down)."""

    token: uuid.UUID
    #: Published and confirmed: to become SCHEDULED_SENT.
    sent: list[int] = field(default_factory=list)
    #: Published, never confirmed: stay claimed until their lease runs out (as after a crash).
    keep: list[int] = field(default_factory=list)


class Ledger:
    """Batches a sender could not record, settled once the database answers again.

    A claim whose answer was lost (the connection dropped at COMMIT) or a record that failed
    leaves rows claimed by the batch's token. Every one of them that was not published is
    given back, by token; without this, a database outage would strand them until an
    operator resends them. It lives as long as its sender.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[Unsettled] = []

    def add(self, batch: Unsettled) -> None:
        with self._lock:
            self._batches.append(batch)

    def __len__(self) -> int:
        with self._lock:
            return len(self._batches)

    def tokens(self) -> list[uuid.UUID]:
        with self._lock:
            return [batch.token for batch in self._batches]

    def settle(self, using: str) -> tuple[int, int]:
        """Record every pending batch, oldest first; (sent, released). Raises if the
        database is still down (what is left stays for the next call)."""
        sent = released = 0
        while True:
            with self._lock:
                if not self._batches:
                    break
                batch = self._batches[0]
            sent += claims.mark_sent(using, batch.token, batch.sent)
            released += claims.release_except(using, batch.token, batch.sent + batch.keep)
            with self._lock:
                self._batches.remove(batch)
        if sent or released:
            logger.warning(
                "scheduler: the database is back; %d forwarded tasks recorded as sent, %d "
                "claimed but unsent tasks released",
                sent,
                released,
            )
        return sent, released


class DatabaseThread:
    """One thread, with its own database connection, that runs a sender's SQL in order.

    In Django's test environment (``db.uses_own_connection()`` is false) the SQL runs in the
    calling thread instead, on the test's own connection: a sender started by a test (``send_now``,
    ``forward_due``, the admin's actions) sees the rows the test wrote and its writes are
    rolled back with the test, as the backend's are.
    """

    def __init__(self, using: str) -> None:
        self.using = using
        self.executor: ThreadPoolExecutor | None = None
        if db.uses_own_connection():
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulldb-scheduler")

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        if self.executor is not None:
            return self.executor.submit(fn, *args, **kwargs)
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed over as the executor would
            future.set_exception(exc)
        return future

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.submit(fn, *args, **kwargs).result()

    def reconnect(self) -> None:
        """Drop the thread's connection (after an error): the next statement opens one."""
        if self.executor is not None:  # inline, the connection is the caller's
            self.run(db.close_quietly, self.using)

    def close(self) -> None:
        if self.executor is None:
            return
        # The thread's connection is its own: close it there, then stop the thread.
        try:
            self.reconnect()
        finally:
            self.executor.shutdown(wait=True)


def lease() -> float:
    """``SCHEDULER_RECLAIM_AFTER`` in seconds; 0: claims are never taken back."""
    return max(0.0, float(conf.get("SCHEDULER_RECLAIM_AFTER") or 0))


class Leases:
    """The claims a sender holds (by token), renewed by a thread of their own.

    Every quarter of the lease the rows the held tokens still claim get a new
    ``date_claimed`` (one UPDATE, on the sender's database thread), so a sender that is
    alive keeps its claims however long the broker makes it wait; a dead one stops
    renewing, and after ``SCHEDULER_RECLAIM_AFTER`` any sender takes them back
    (``claims.reclaim``). A batch is held from its claim until it is recorded.
    """

    def __init__(self, database: Any, seconds: float) -> None:
        self.database = database
        self.seconds = seconds
        self._lock = threading.Lock()
        self._held: set[uuid.UUID] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # Inline (Django's test environment, the transactional publish's hook) the statements
        # run on the caller's connection, not from another thread: nothing to renew there
        # (such a claim lives for one call; one a dead process left is taken back as any).
        if seconds > 0 and getattr(database, "executor", None) is not None:
            self._thread = threading.Thread(
                target=self._run, name="fulldb-scheduler-leases", daemon=True
            )
            self._thread.start()

    def hold(self, token: uuid.UUID) -> None:
        with self._lock:
            self._held.add(token)

    def drop(self, token: uuid.UUID) -> None:
        with self._lock:
            self._held.discard(token)

    def held(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._held)

    def renew(self) -> int:
        tokens = self.held()
        if not tokens:
            return 0
        return self.database.run(claims.renew, self.database.using, tokens)

    def _run(self) -> None:
        while not self._stopped.wait(self.seconds / 4):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - database down: the next beat tries again
                logger.warning("scheduler: could not renew the claims' lease", exc_info=True)

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Sender:
    """Forwards due rows of one app; see the module's docstring. A context manager."""

    def __init__(self, app: Any, using: str | None = None, database: Any = None) -> None:
        """``database``: what runs the sender's SQL (``DatabaseThread``'s interface); by
        default a thread of its own with its own connection."""
        self.app = app
        self.using = using or db.task_db_alias()
        self.database = database if database is not None else DatabaseThread(self.using)
        self.publisher = Publisher(app)
        self.ledger = Ledger()
        self.lease = lease()
        self.leases = Leases(self.database, self.lease)
        self._next_reclaim = 0.0

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Record what the ledger holds (if the database answers), close the connections."""
        try:
            if len(self.ledger):
                try:
                    self.settle()
                except Exception as exc:  # noqa: BLE001 - database still down
                    logger.error(
                        "scheduler: %d batches could not be recorded (%r); their rows stay "
                        "claimed and find_stale_scheduled_tasks reports them (tokens %s)",
                        len(self.ledger),
                        exc,
                        ", ".join(str(token) for token in self.ledger.tokens()),
                    )
        finally:
            self.leases.close()
            self.publisher.close()
            self.database.close()

    @property
    def unrecorded(self) -> int:
        """How many batches this sender still has to record (``settle``)."""
        return len(self.ledger)

    def settle(self) -> tuple[int, int]:
        """Record what a database outage kept this sender from recording; (sent, released)."""
        return self.database.run(self.ledger.settle, self.using)

    def seconds_until_next(self, cap: float) -> float:
        """How long the sender may sleep: until the next eta, at most ``cap`` seconds."""
        return self.database.run(claims.seconds_until_next, self.using, cap)

    def reconnect(self) -> None:
        """After an error: new database and broker connections for the next pass."""
        self.database.reconnect()
        self.publisher.close()

    # -- a forwarding run ------------------------------------------------------------

    def forward_due(self, batch_size: int | None = None, max_seconds: float | None = None):
        """Forward every due row (batch after batch) until none is due or time is up.

        Expired rows are revoked first. Raises the first database error once every batch
        in flight is accounted for (the ledger holds what could not be recorded).
        """
        batch_size = batch_size or int(conf.get("SCHEDULER_BATCH_SIZE"))
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        total = PassResult()
        self.settle()
        total.reclaimed = self.reclaim()
        total.expired = self.database.run(revoke.expire_due, self.app, self.using)
        ahead: tuple[uuid.UUID, Future] | None = self._claim_ahead(batch_size)
        records: list[tuple[Future, int, Published]] = []
        try:
            while ahead is not None:
                token, claimed = ahead
                ahead = None
                rows: list[ClaimedRow] = claimed.result()
                if not rows:
                    break
                if deadline is None or time.monotonic() <= deadline:
                    ahead = self._claim_ahead(batch_size)  # overlaps the publishing below
                published = self.publisher.publish(rows, token)
                records.append((self.database.submit(self.record, published), len(rows), published))
                if published.broker_failed:
                    break  # stop, and give back what was claimed ahead
        finally:
            error = self._finish(ahead, records, total)
        if error is not None:
            raise error
        return total

    def reclaim(self) -> int:
        """Take back the claims of dead senders (``claims.reclaim``), at most every quarter
        of the lease; how many rows. They are forwarded by this run or a later one."""
        if self.lease <= 0 or time.monotonic() < self._next_reclaim:
            return 0
        self._next_reclaim = time.monotonic() + max(1.0, self.lease / 4)
        count, sample = self.database.run(claims.reclaim, self.using, timedelta(seconds=self.lease))
        if count:
            logger.warning(
                "scheduler: took back %d tasks claimed by a sender that stopped renewing its "
                "claims %.0f s ago (it died); forwarding them again (the workers run each "
                "attempt once): %s%s",
                count,
                self.lease,
                ", ".join(sample),
                ", ..." if count > len(sample) else "",
            )
        return count

    def _claim_ahead(self, batch_size: int) -> tuple[uuid.UUID, Future]:
        token = uuid.uuid4()
        return token, self.database.submit(self._claim, token, batch_size)

    def _claim(self, token: uuid.UUID, batch_size: int) -> list[ClaimedRow]:
        """``claims.claim``; if it fails, the claim may still have committed: the ledger
        gives it back."""
        self.leases.hold(token)  # from before the claim: it may commit and its answer be lost
        try:
            rows = claims.claim(self.using, token, batch_size)
        except Exception:
            self.leases.drop(token)  # the ledger gives it back, or the lease once we are gone
            self.ledger.add(Unsettled(token))
            raise
        if not rows:
            self.leases.drop(token)
        return rows

    def record(self, published: Published) -> int:
        """Mark sent rows SCHEDULED_SENT (delete those whose result is ignored), failed ones
        FAILURE, release the unsent ones; return how many were released. If the database
        fails, the batch goes to the ledger and the error is raised."""
        token = published.token
        try:
            claims.mark_sent(self.using, token, published.sent)
            for row_id, error in published.failures:
                claims.fail(self.using, token, row_id, error)
            return claims.release(self.using, token, published.unsent)
        except Exception:
            self.ledger.add(Unsettled(token, published.sent, published.unconfirmed))
            raise
        finally:
            # Recorded (or left to the ledger): rows still claimed now are unconfirmed ones,
            # which may or may not be in the queue; the lease lets them be taken back.
            self.leases.drop(token)

    def _finish(
        self,
        ahead: tuple[uuid.UUID, Future] | None,
        records: list[tuple[Future, int, Published]],
        total: PassResult,
    ) -> BaseException | None:
        """Give back the batch claimed ahead and wait for every record; the first error.

        Whatever the database did not take is in the ledger by then, so an error loses
        nothing: the next pass (or ``close``) settles it.
        """
        error: BaseException | None = None
        if ahead is not None:  # claimed ahead, never published: give it back at once
            token, claimed = ahead
            try:
                rows = claimed.result()
            except Exception as exc:  # noqa: BLE001 - database down: _claim kept it
                rows, error = [], exc
            total.claimed += len(rows)
            try:
                total.released += self.database.run(
                    claims.release, self.using, token, [row["id"] for row in rows]
                )
            except Exception as exc:  # noqa: BLE001 - database down: the ledger gives it back
                self.ledger.add(Unsettled(token))
                error = error or exc
            finally:
                self.leases.drop(token)
        for recorded, claimed_count, published in records:
            try:
                released = recorded.result()
            except Exception as exc:  # noqa: BLE001 - database down: _record used the ledger
                error = error or exc
                released = 0
            total.add(published.outcome(claimed_count, released))
        return error


def forward_due(app: Any, batch_size: int | None = None, max_seconds: float | None = None):
    """One forwarding run with a sender of its own (the beat task ``send_scheduled_task``).

    Never inside a caller's transaction on SQLite (its one writer would wait for the
    caller); on other databases the run uses its own connection whatever the caller does.
    """
    refuse_in_sqlite_transaction("forward_due")
    with Sender(app) as sender:
        return sender.forward_due(batch_size, max_seconds)


def refuse_in_sqlite_transaction(what: str) -> None:
    """The sender's own connection would wait for this thread's transaction on SQLite (in
    Django's test environment the sender uses this thread's connection: no refusal)."""
    connection = connections[db.task_db_alias()]
    if not db.uses_own_connection():
        return
    if connection.vendor == "sqlite" and connection.in_atomic_block:
        raise TransactionManagementError(
            f"{what}: the scheduler writes on a connection of its own, which SQLite's single "
            "writer would block until this transaction ends; call it outside atomic()"
        )
