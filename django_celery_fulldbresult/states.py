"""Task states: Celery's, plus the two states of the database ETA scheduler."""

from celery import states as celery_states

PENDING = celery_states.PENDING
RECEIVED = celery_states.RECEIVED
STARTED = celery_states.STARTED
RETRY = celery_states.RETRY
SUCCESS = celery_states.SUCCESS
FAILURE = celery_states.FAILURE
REVOKED = celery_states.REVOKED

#: Held in the database until its ETA; not yet sent to the broker.
SCHEDULED = "SCHEDULED"
#: Forwarded to the broker by the scheduler; the worker's states follow.
SCHEDULED_SENT = "SCHEDULED_SENT"

#: States a task never leaves on its own (Celery's READY_STATES).
FINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
#: 0.5.x name, kept so old imports work.
TERMINAL_STATES = FINAL_STATES

#: The known states that are not final. Custom states (``update_state``) are
#: not final either.
UNFINISHED_STATES = frozenset({PENDING, RECEIVED, STARTED, RETRY, SCHEDULED, SCHEDULED_SENT})

#: States a revoke from outside the worker running the task may end (Celery 5.7's rule: a
#: task another worker started, or that has a result, is left to that worker).
REVOCABLE_STATES = frozenset(
    {PENDING, RECEIVED, RETRY, celery_states.REJECTED, SCHEDULED, SCHEDULED_SENT}
)

#: An attempt no worker has taken yet (the receipt claim may take it, ``receipt``).
UNRECEIVED_STATES = frozenset({PENDING, SCHEDULED, SCHEDULED_SENT})
#: States that end an attempt: a copy of its message must not run it again.
ENDED_STATES = FINAL_STATES | {RETRY}

ALL_STATES = frozenset(celery_states.ALL_STATES) | {SCHEDULED, SCHEDULED_SENT}

#: Sorted so that migrations stay stable.
STATE_CHOICES = sorted((state, state) for state in ALL_STATES)
