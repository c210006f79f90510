"""The PostgreSQL statements of result push, in one place.

A row-level trigger on the task table calls ``pg_notify`` for every state a write sets
(PENDING and the scheduler's own states excepted), with ``"<status> <task id>"`` as the
payload, but only while some session is registered in ``fulldbresult_listener`` (an UNLOGGED
table of listening backends' pids): a project where nobody waits for results pays one probe
of an empty table per write, not NOTIFY's commit-time lock.
"""

from __future__ import annotations

CHANNEL = "fulldbresult"
LISTENERS = "fulldbresult_listener"
FUNCTION = "fulldbresult_notify"
TRIGGER = "fulldbresult_notify"
#: States no waiter needs to hear of: a published or scheduled task is not done.
SILENT_STATES = ("PENDING", "SCHEDULED", "SCHEDULED_SENT")


def install(table: str) -> list[str]:
    """The listeners table, the trigger function and the trigger on ``table``."""
    silent = ", ".join(f"'{state}'" for state in SILENT_STATES)
    return [
        f"CREATE UNLOGGED TABLE IF NOT EXISTS {LISTENERS} ("
        " pid integer PRIMARY KEY, since timestamptz NOT NULL DEFAULT now())",
        f"""CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {LISTENERS}) THEN
        PERFORM pg_notify('{CHANNEL}', NEW.status || ' ' || NEW.task_id);
    END IF;
    RETURN NULL;
END
$$""",
        f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table}",
        f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OF status ON {table}"
        f" FOR EACH ROW WHEN (NEW.status NOT IN ({silent})) EXECUTE FUNCTION {FUNCTION}()",
    ]


def uninstall(table: str) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table}",
        f"DROP FUNCTION IF EXISTS {FUNCTION}()",
        f"DROP TABLE IF EXISTS {LISTENERS}",
    ]


#: A listening session's own statements, in the order it runs them: forget the registrations
#: of sessions that are gone (a killed process leaves its row), register, listen.
PRUNE = (
    f"DELETE FROM {LISTENERS} l"
    " WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid)"
)
REGISTER = (
    f"INSERT INTO {LISTENERS} (pid) VALUES (pg_backend_pid())"
    " ON CONFLICT (pid) DO UPDATE SET since = now()"
)
LISTEN = f"LISTEN {CHANNEL}"
#: A new session's check that it hears the channel (a payload no state has).
PROBE = "PROBE"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', %s)"
UNREGISTER = f"DELETE FROM {LISTENERS} WHERE pid = pg_backend_pid()"
