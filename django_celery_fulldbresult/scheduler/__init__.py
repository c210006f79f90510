"""The database ETA scheduler: ``eta``/``countdown`` tasks wait as rows, not in worker memory.

A row's life (``status``, and ``scheduled_id``: the token of the sender holding it)::

    state               event                                 next state          by
    ------------------  ------------------------------------  ------------------  ----------
    (none)              call with a future eta                SCHEDULED           intercept
    (none)              call in a transaction (outbox)        SCHEDULED, grace    intercept
    SCHEDULED           the caller committed: on-commit hook  claimed, as below   outbox
    SCHEDULED           due, unexpired: claimed (token)       SCHEDULED, claimed  claims
    SCHEDULED           due, expired                          REVOKED             revoke
    SCHEDULED           cancel, AsyncResult.revoke()          REVOKED             revoke
    SCHEDULED, claimed  the broker confirmed it               SCHEDULED_SENT      sender
    SCHEDULED, claimed  the broker refused it, or failed      SCHEDULED           sender
    SCHEDULED, claimed  its stored call cannot be decoded     FAILURE             sender
    SCHEDULED, claimed  no confirm came / the sender died     SCHEDULED (lease)   claims
    SCHEDULED, claimed  AsyncResult.revoke()                  REVOKED             revoke
    SCHEDULED, claimed  --resend, once the claim is old       as above            operations
    SCHEDULED_SENT      the worker runs it                    STARTED, ...        backend
    SCHEDULED_SENT      received, its result ignored          (row deleted)       receipt

The conditions are written once, as the task QuerySet's vocabulary
(``ready_to_send()``: due, unclaimed, unexpired; ``claimed(token)``; ``release()``;
``mark_sent()``), and the PostgreSQL claim compiles the same QuerySet. A claim is a
lease its sender renews: the claims of a sender that died between claim and record come
back to the other senders after ``SCHEDULER_RECLAIM_AFTER`` (``lease_expired``), and the
worker runs each attempt once (``receipt``). With the setting at 0 a claim is at most
once: such rows stay claimed, reported by ``find_stale_scheduled_tasks``.

Modules, one concern each:

* ``intercept``: a call becomes a SCHEDULED row (``maybe_schedule``, ``install(app)``);
* ``claims``: the sender's SQL (claim per database vendor, record);
* ``publishing``: publishing a claimed row as Celery would, with publisher confirms;
* ``sender``: the ``Sender`` (pipelined claim / publish / record, its connections, the
  ledger of what a database outage kept it from recording) and ``forward_due``;
* ``revoke``: cancel, ``AsyncResult.revoke()``, expiry, and what they tell chords;
* ``operations``: send now, resend a dead sender's claims;
* ``outbox``: transactional publish, a call held in the caller's transaction published
  after its commit (an on-commit hook; a sender if the process died first).
"""

from .claims import seconds_until_next
from .intercept import (
    AT_ONCE,
    IN_TRANSACTION,
    TransactionalPublishError,
    forwarding,
    install,
    is_forwarding,
    is_installed,
    maybe_schedule,
    uninstall,
    wants_scheduling,
)
from .operations import cancel_scheduled, make_due, resend_stale, safe_resend_age, send_now
from .revoke import revoke_waiting
from .rows import ClaimedRow, PassResult, claimed_values
from .sender import Sender, forward_due

__all__ = [
    "AT_ONCE",
    "IN_TRANSACTION",
    "ClaimedRow",
    "PassResult",
    "Sender",
    "TransactionalPublishError",
    "cancel_scheduled",
    "claimed_values",
    "forward_due",
    "forwarding",
    "install",
    "is_forwarding",
    "is_installed",
    "make_due",
    "maybe_schedule",
    "resend_stale",
    "revoke_waiting",
    "safe_resend_age",
    "seconds_until_next",
    "send_now",
    "uninstall",
    "wants_scheduling",
]
