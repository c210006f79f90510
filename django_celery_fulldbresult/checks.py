"""Django system checks for the mistakes users make (``manage.py check``; docs/ref/checks.rst).

Registered by ``AppConfig.ready``, so they run only when the app is in ``INSTALLED_APPS``:
a project that forgot it is stopped by ``installation.require_installed`` at first use.

Settings checks read Django settings and the current Celery app's configuration (the app
the project's ``celery.py`` configures from Django settings), never the database. Checks
tagged ``database`` query the task database and run only when asked for it
(``manage.py check --database <alias>``, ``migrate``'s own checks).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from datetime import timedelta
from typing import Any

import django
from celery import current_app
from django.apps import apps
from django.conf import settings
from django.core.checks import Error, Info, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router
from django.db.migrations.executor import MigrationExecutor
from django.db.models import Count, Min
from django.utils import timezone

from . import beat, conf
from .installation import APP
from .models import TaskResultMeta

#: The tag of the package's settings checks: ``manage.py check --tag django_celery_fulldbresult``
#: (its database checks: ``manage.py check --database <alias>``).
TAG = APP
#: A SCHEDULED row this far past its eta means no sender forwards it (run_scheduler sends
#: within about a second, the beat entry within its period, 60 s by default).
OVERDUE_AFTER = timedelta(minutes=5)
#: The only isolation level the package's statements are written for on MySQL/MariaDB.
READ_COMMITTED = "read committed"


def _id(code: str) -> str:
    return f"{APP}.{code}"


def _setting(name: str) -> str:
    return conf.PREFIX + name


def scheduler_enabled() -> bool:
    return bool(conf.get("SCHEDULE_ETA") or conf.get("MONKEY_PATCH_ASYNC"))


def _uses_beat_database_scheduler(celery_conf: Any) -> bool:
    scheduler = celery_conf.beat_scheduler
    name = scheduler if isinstance(scheduler, str) else getattr(scheduler, "__module__", "")
    return (name or "").startswith("django_celery_beat")


# -- settings -----------------------------------------------------------------------------


@register(TAG)
def check_beat_features(app_configs: Any = None, **kwargs: Any) -> list:
    """E001, W003, W004: the beat integration needs django-celery-beat, on a Django it
    supports."""
    errors: list = []
    celery_conf = current_app.conf
    missing = beat.missing()
    if missing and scheduler_enabled() and _uses_beat_database_scheduler(celery_conf):
        errors.append(
            Error(
                f"CELERY_BEAT_SCHEDULER is django-celery-beat's ({celery_conf.beat_scheduler!r}) "
                f"but {missing}: celery beat cannot start, so {beat.SENDER_TASK} never "
                "forwards the delayed tasks the database holds.",
                hint=beat.hint(
                    "remove CELERY_BEAT_SCHEDULER and forward delayed tasks with "
                    "`python manage.py run_scheduler`"
                ),
                id=_id("E001"),
            )
        )
    if missing and conf.get("OVERRIDE_BEAT_ADMIN"):
        errors.append(
            Warning(
                f"{_setting('OVERRIDE_BEAT_ADMIN')} is set but {missing}: the periodic "
                "tasks' admin with Run now is not installed, the setting does nothing.",
                hint=beat.hint(f"remove {_setting('OVERRIDE_BEAT_ADMIN')}"),
                id=_id("W003"),
            )
        )
    unsupported = beat_unsupported_django()
    if unsupported:
        errors.append(
            Warning(
                f"django-celery-beat {unsupported[0]} declares {unsupported[1]}, and this is "
                f"Django {django.get_version()}: its models, admin and DatabaseScheduler (and "
                "with them Run now, setup_scheduler_beat and the send_scheduled_task entry) "
                "may fail.",
                hint=(
                    "Use a Django that django-celery-beat supports, or remove "
                    "'django_celery_beat' from INSTALLED_APPS (and "
                    f"{_setting('OVERRIDE_BEAT_ADMIN')}) and forward delayed tasks with "
                    "`python manage.py run_scheduler`."
                ),
                id=_id("W004"),
            )
        )
    return errors


def beat_unsupported_django() -> tuple[str, str] | None:
    """(django-celery-beat's version, its Django requirement) when the installed
    django-celery-beat, in INSTALLED_APPS, declares it does not support this Django."""
    if not apps.is_installed("django_celery_beat"):
        return None
    try:
        distribution = importlib.metadata.distribution("django-celery-beat")
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in distribution.requires or ():
        requirement = _django_requirement(line)
        if requirement is None:
            continue
        specifier, supported = requirement
        if not supported:
            return distribution.version, f"Django{specifier}"
    return None


def _django_requirement(line: str) -> tuple[str, bool] | None:
    """(the specifier, whether this Django satisfies it) for a ``Django...`` requirement
    line of a distribution's metadata, else None."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging is not a dependency: the known bound instead
        rest = line[len("django") :].lstrip()
        if ";" in line or not line.lower().startswith("django") or rest[:1] not in tuple("<>=!~"):
            return None
        return rest, django.VERSION[:2] < beat.UNSUPPORTED_DJANGO
    requirement = Requirement(line)
    if requirement.name.lower() != "django" or requirement.marker is not None:
        return None
    specifier = str(requirement.specifier)
    return specifier, requirement.specifier.contains(django.get_version(), prereleases=True)


#: What goes wrong: [above READ COMMITTED, below it].
_ISOLATION_EFFECTS = (
    "Under REPEATABLE READ and SERIALIZABLE InnoDB's locking reads and upserts take gap "
    "locks: the scheduler's claims (SELECT ... FOR UPDATE SKIP LOCKED over due rows) block "
    "delayed calls being inserted, concurrent state writes deadlock more often, and a read "
    "of the task table inside a transaction keeps its first snapshot (polling there never "
    "sees the result).",
    "Under READ UNCOMMITTED readers see writes that may still be rolled back: a result "
    "read or a stale report may rest on a state that never happened.",
)


@register(TAG)
def check_isolation_level(app_configs: Any = None, **kwargs: Any) -> list:
    """W005: MySQL/MariaDB task database not in READ COMMITTED. Read from settings, no
    query: Django sets each session's level from ``OPTIONS["isolation_level"]`` (default
    READ COMMITTED; None leaves the server's)."""
    errors: list = []
    aliases = [conf.database()]
    if conf.get("CONNECTION"):
        aliases.append(conf.get("CONNECTION"))
    for alias in aliases:
        database = settings.DATABASES.get(alias)
        if not database or "mysql" not in database.get("ENGINE", ""):
            continue
        options = database.get("OPTIONS") or {}
        level = options.get("isolation_level", READ_COMMITTED)
        if (level or "").lower() == READ_COMMITTED:
            continue
        shown = repr(level) if level else "the server's default (REPEATABLE READ on InnoDB)"
        errors.append(
            Warning(
                f"The task database DATABASES[{alias!r}] uses the isolation level {shown}; "
                "django-celery-fulldbresult is written and tested for READ COMMITTED "
                "(Django's default for MySQL). "
                + _ISOLATION_EFFECTS[(level or "").lower() == "read uncommitted"],
                hint=(
                    f'Set DATABASES[{alias!r}]["OPTIONS"]["isolation_level"] = '
                    '"read committed" (or remove the option).'
                ),
                id=_id("W005"),
            )
        )
    return errors


@register(TAG)
def check_ignored_results_with_publish_tracking(app_configs: Any = None, **kwargs: Any) -> list:
    """W006: publish tracking with every result ignored by default."""
    if not conf.track_publish() or not current_app.conf.task_ignore_result:
        return []
    return [
        Warning(
            f"{_setting('TRACK_PUBLISH')} is on but CELERY_TASK_IGNORE_RESULT = True: a task "
            "whose result is ignored gets no PENDING row (a row nobody finishes would be "
            "reported stale for ever), so publish tracking records only the tasks declared "
            "with ignore_result=False.",
            hint=(
                "Set CELERY_TASK_IGNORE_RESULT = False (and ignore_result=True on the tasks "
                f"whose results you do not need), or remove {_setting('TRACK_PUBLISH')}."
            ),
            id=_id("W006"),
        )
    ]


@register(TAG)
def check_recovery_policies(app_configs: Any = None, **kwargs: Any) -> list:
    """E002: ``RECOVER`` is not (pattern, policy) pairs of known policies."""
    from . import recovery

    try:
        recovery.policy_rules()
    except ImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                hint=f"Policies: {', '.join(recovery.POLICIES)} (docs/ref/settings.rst).",
                id=_id("E002"),
            )
        ]
    return []


@register(TAG)
def check_transactional_publish(app_configs: Any = None, **kwargs: Any) -> list:
    """W007: transactional publish without the scheduler, which holds and forwards its rows."""
    if not conf.get("TRANSACTIONAL_PUBLISH") or conf.get("SCHEDULE_ETA"):
        return []
    return [
        Warning(
            f"{_setting('TRANSACTIONAL_PUBLISH')} is on but {_setting('SCHEDULE_ETA')} is off: "
            "no call is held until its transaction commits (tasks sent inside atomic() are "
            "published at once and a rollback does not take them back).",
            hint=(
                f"Set {_setting('SCHEDULE_ETA')} = True (and {_setting('MONKEY_PATCH_ASYNC')} "
                "= True, or the ScheduledTask base class), and run `manage.py run_scheduler` "
                "or the send_scheduled_task beat entry, which forwards what a process that "
                "died after its commit did not publish."
            ),
            id=_id("W007"),
        )
    ]


# -- database -----------------------------------------------------------------------------


def _task_database(databases: Any) -> str | None:
    """The task database's alias when the caller asked for its checks, else None."""
    alias = conf.database()
    if not databases or alias not in databases:
        return None
    return alias


def unapplied_migrations(alias: str) -> list[str]:
    """Names of the package's migrations not applied on ``alias``."""
    executor = MigrationExecutor(connections[alias])
    targets = [key for key in executor.loader.graph.leaf_nodes() if key[0] == APP]
    plan = executor.migration_plan(targets)
    return [migration.name for migration, backwards in plan if not backwards]


# Tagged ``database`` only: Django 6.1 runs a database check on every alias when its tag is
# asked for (``check --tag ...``), Django 4.2-6.0 never without ``--database``.
@register(Tags.database)
def check_task_database(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list:
    """W001 (migrations not applied), W002 (overdue delayed tasks), I001 (no sender found)."""
    alias = _task_database(databases)
    if alias is None:
        return []
    unapplied = unapplied_migrations(alias)
    if unapplied and _migrating():
        return []
    if unapplied:
        return [
            Warning(
                f"{len(unapplied)} migration(s) of {APP} are not applied on the task database "
                f"{alias!r} ({', '.join(unapplied)}): the result backend, publish tracking and "
                "the scheduler fail on their first statement.",
                hint=f"Run `python manage.py migrate {APP} --database {alias}`.",
                id=_id("W001"),
            )
        ]
    errors: list = []
    overdue = _overdue(alias)
    if overdue is not None:
        count, oldest = overdue
        errors.append(
            Warning(
                f"{count} delayed task(s) are waiting in the task database more than "
                f"{int(OVERDUE_AFTER.total_seconds() // 60)} minutes past their eta (the "
                f"oldest since {oldest.isoformat()}): no sender is forwarding them.",
                hint=(
                    "Run `python manage.py run_scheduler` (a daemon), or `python manage.py "
                    "setup_scheduler_beat --every 60` with celery beat running "
                    "django-celery-beat's DatabaseScheduler; a sender that crashed mid-batch "
                    "leaves claimed rows for `find_stale_scheduled_tasks`."
                ),
                id=_id("W002"),
            )
        )
    if scheduler_enabled() and not overdue and not _sender_configured():
        errors.append(
            Info(
                f"{_setting('SCHEDULE_ETA')} / {_setting('MONKEY_PATCH_ASYNC')} keep delayed "
                "tasks in the database, and no beat entry runs "
                f"{beat.SENDER_TASK} (neither in CELERY_BEAT_SCHEDULE nor as an enabled "
                "django-celery-beat PeriodicTask). Nothing is forwarded unless "
                "`manage.py run_scheduler` runs, which a check cannot see.",
                hint=(
                    "Run `python manage.py run_scheduler` as a service, or `python manage.py "
                    "setup_scheduler_beat --every 60`. If run_scheduler runs, add "
                    f"'{_id('I001')}' to SILENCED_SYSTEM_CHECKS."
                ),
                id=_id("I001"),
            )
        )
    return errors


def _migrating() -> bool:
    """``manage.py migrate`` runs the database checks before it migrates: there W001 would
    tell a user who is applying the migrations to apply them (a new project's first
    ``migrate`` would start with it). Django offers no way to know the running command but
    the command line."""
    return sys.argv[1:2] == ["migrate"]


def _overdue(alias: str) -> tuple[int, Any] | None:
    """(count, oldest eta) of unclaimed SCHEDULED rows overdue by ``OVERDUE_AFTER``."""
    cutoff = timezone.now() - OVERDUE_AFTER
    figures = (
        TaskResultMeta.objects.using(alias)
        .scheduled()
        .unclaimed()
        .filter(eta__lte=cutoff)
        .aggregate(count=Count("pk"), oldest=Min("eta"))
    )
    return (figures["count"], figures["oldest"]) if figures["count"] else None


def _sender_configured() -> bool:
    """A beat entry that runs send_scheduled_task: in the Celery app's beat_schedule or as
    an enabled django-celery-beat PeriodicTask (when beat's tables exist)."""
    schedule = current_app.conf.beat_schedule or {}
    if any(entry.get("task") == beat.SENDER_TASK for entry in schedule.values()):
        return True
    if not apps.is_installed("django_celery_beat"):
        return False
    periodic_task = apps.get_model("django_celery_beat", "PeriodicTask")
    beat_alias = router.db_for_read(periodic_task)
    with connections[beat_alias].cursor() as cursor:
        tables = connections[beat_alias].introspection.table_names(cursor)
    if periodic_task._meta.db_table not in tables:
        return False  # beat's migrations not applied: no entry can exist
    return (
        periodic_task.objects.using(beat_alias).filter(task=beat.SENDER_TASK, enabled=True).exists()
    )
