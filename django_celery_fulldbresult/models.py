"""The task table and its companions (groups, chord counters, worker heartbeats)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import models
from django.db.models import Case, F, Q, When
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import installation, serialization
from .managers import GroupResultManager, TaskDatabaseManager, TaskResultManager
from .states import FINAL_STATES, PENDING, SCHEDULED

# A project that forgot the app gets ImproperlyConfigured naming the fix, not a RuntimeError.
installation.require_installed()


def _json_field(verbose_name: str, **kwargs: Any) -> models.JSONField:
    return models.JSONField(
        verbose_name,
        null=True,
        blank=True,
        encoder=serialization.JSONEncoder,
        decoder=serialization.JSONDecoder,
        **kwargs,
    )


class TaskResultMeta(models.Model):
    """One row per task id: what was sent, where, and what became of it.

    Attribute names of 0.5.x are kept (``task``, ``args``, ``kwargs``,
    ``status``, ``result``, ``date_submitted``, ``date_done``, ``eta``,
    ``expires``, ``hostname``, ``traceback``).
    """

    id = models.BigAutoField(primary_key=True)
    task_id = models.CharField(_("task id"), max_length=255, unique=True)
    task = models.CharField(_("task name"), max_length=255, blank=True, default="")
    # No choices: custom states set through update_state() are valid states.
    status = models.CharField(_("state"), max_length=50, default=PENDING)

    # The call, exactly: JSON with typed envelopes, or packed with the task serializer.
    args = _json_field(_("arguments"))
    kwargs = _json_field(_("keyword arguments"))
    packed_args = models.BinaryField(
        _("packed arguments"),
        null=True,
        blank=True,
        help_text=_("(args, kwargs) encoded with the task serializer when JSON cannot hold them"),
    )
    packed_args_content_type = models.CharField(max_length=128, null=True, blank=True)
    argsrepr = models.TextField(_("arguments (repr)"), null=True, blank=True)
    kwargsrepr = models.TextField(_("keyword arguments (repr)"), null=True, blank=True)
    replayable = models.BooleanField(
        _("replayable"),
        default=True,
        help_text=_("False when the arguments were deliberately not stored"),
    )
    options = _json_field(
        _("message options"),
        help_text=_("link, link_error, chain, chord, headers, time limits, shadow, ..."),
    )

    # Routing.
    queue = models.CharField(_("queue"), max_length=255, null=True, blank=True)
    exchange = models.CharField(_("exchange"), max_length=255, null=True, blank=True)
    routing_key = models.CharField(_("routing key"), max_length=255, null=True, blank=True)
    priority = models.PositiveSmallIntegerField(_("priority"), null=True, blank=True)

    # Lineage.
    parent_id = models.CharField(_("parent id"), max_length=255, null=True, blank=True)
    root_id = models.CharField(_("root id"), max_length=255, null=True, blank=True)
    group_id = models.CharField(_("group id"), max_length=255, null=True, blank=True)
    periodic_task_name = models.CharField(
        _("periodic task name"), max_length=255, null=True, blank=True
    )
    # Set on the copies the admin's Retry action sends: the task id they were copied from.
    retried_from = models.CharField(
        _("retried from"), max_length=255, null=True, blank=True, editable=False
    )

    # Outcome.
    result = models.TextField(_("result"), null=True, blank=True, editable=False)
    content_type = models.CharField(_("result content type"), max_length=128, null=True)
    content_encoding = models.CharField(_("result encoding"), max_length=64, null=True)
    traceback = models.TextField(_("traceback"), null=True, blank=True)
    meta = _json_field(_("meta"), editable=False)
    hostname = models.CharField(_("worker"), max_length=255, null=True, blank=True)
    retries = models.PositiveIntegerField(_("retries"), default=0)

    # Time.
    eta = models.DateTimeField(_("eta"), null=True, blank=True)
    expires = models.DateTimeField(_("expires"), null=True, blank=True)
    date_submitted = models.DateTimeField(_("submitted at"), null=True, blank=True)
    date_started = models.DateTimeField(_("started at"), null=True, blank=True)
    date_done = models.DateTimeField(_("done at"), null=True, blank=True)
    date_modified = models.DateTimeField(_("last state change"), default=timezone.now)

    # Database ETA scheduler: the claim of the sender forwarding this row (0.5.x name).
    scheduled_id = models.UUIDField(_("sender claim"), null=True, blank=True, editable=False)
    date_claimed = models.DateTimeField(_("claimed at"), null=True, blank=True, editable=False)

    objects = TaskResultManager()

    class Meta:
        verbose_name = _("task state")
        verbose_name_plural = _("task states")
        indexes = [
            # Stale-task queries: unfinished rows by age (PostgreSQL, SQLite).
            models.Index(
                fields=["date_modified"],
                name="fdr_unfinished_idx",
                condition=~Q(status__in=sorted(FINAL_STATES)),
            ),
            # Stale queries where partial indexes do not exist (MySQL), and state filters.
            models.Index(fields=["status", "date_modified"], name="fdr_state_modified_idx"),
            # Scheduled rows by due time: the scheduler's due poll, overdue checks and the
            # backlog in stats() (an index-only scan). Only SCHEDULED rows pay for it on a
            # write; MySQL ignores the condition and keeps a plain (status, eta) index, which
            # serves the same queries there.
            models.Index(
                fields=["status", "eta"],
                name="fdr_scheduled_eta_idx",
                condition=Q(status=SCHEDULED),
            ),
            # Claims by age: the senders' reclaim of a dead sender's claims (lease_expired).
            # MySQL has no partial index: there fdr_scheduled_eta_idx reads the scheduled rows.
            models.Index(
                fields=["date_claimed"],
                name="fdr_claimed_idx",
                condition=Q(status=SCHEDULED, scheduled_id__isnull=False),
            ),
            # Final rows by date_done: expiry cleanup, stats() and its rollups. Only final
            # rows have date_done: the earlier writes of a task skip the index (MySQL ignores
            # the condition, a plain index there).
            models.Index(
                fields=["date_done"],
                name="fdr_done_idx",
                condition=Q(date_done__isnull=False),
            ),
            # Admin: task-name filter (newest first) and name-prefix search. On PostgreSQL
            # the pattern operator class lets LIKE 'prefix%' use it whatever the collation.
            models.Index(
                fields=["task", "id"],
                name="fdr_task_idx",
                opclasses=["varchar_pattern_ops", "int8_ops"],
            ),
            # Admin: periodic-task filter; most rows have no periodic task name.
            models.Index(
                fields=["periodic_task_name", "id"],
                name="fdr_periodic_idx",
                condition=Q(periodic_task_name__isnull=False),
            ),
            # Admin: the "submitted" filter. Without it a range holding fewer rows than the
            # changelist's capped count walks the whole table to finish counting.
            models.Index(fields=["date_submitted"], name="fdr_submitted_idx"),
            # Admin: the copies of a retried task. NULL for almost every row, whose writes
            # skip the index (a plain index on MySQL, which ignores the condition).
            models.Index(
                fields=["retried_from"],
                name="fdr_retried_from_idx",
                condition=Q(retried_from__isnull=False),
            ),
        ]
        permissions = [
            ("retry_taskresultmeta", _("Can retry task results")),
            ("cancel_taskresultmeta", _("Can cancel scheduled tasks")),
            ("send_now_taskresultmeta", _("Can send scheduled tasks now")),
            ("revoke_taskresultmeta", _("Can revoke tasks")),
        ]

    def __str__(self) -> str:
        return f"<Task: {self.task_id} state={self.status}>"

    # Celery's result_extended names.
    @property
    def name(self) -> str:
        return self.task

    @property
    def worker(self) -> str | None:
        return self.hostname

    @property
    def state(self) -> str:
        return self.status

    def get_call(self, accept=None) -> tuple[list, dict]:
        """The stored (args, kwargs), whether kept as JSON or packed."""
        if self.packed_args is not None:
            return serialization.decode_packed(
                self.packed_args, self.packed_args_content_type, accept
            )
        return list(self.args or []), dict(self.kwargs or {})

    def get_result(self, accept=None) -> Any:
        """The decoded result; pickle is refused unless the app's result accept list allows it."""
        if accept is None:
            from celery import current_app

            accept = current_app.backend.accept
        return serialization.decode_result(
            self.result, self.content_type, self.content_encoding, accept
        )

    @property
    def result_repr(self) -> str:
        return "" if self.result is None else str(self.result)


class GroupResultMeta(models.Model):
    """A saved ``GroupResult`` (``GroupResult.save()``), one row per group id."""

    id = models.BigAutoField(primary_key=True)
    group_id = models.CharField(_("group id"), max_length=255, unique=True)
    result = models.TextField(_("result"), editable=False)
    content_type = models.CharField(max_length=128)
    content_encoding = models.CharField(max_length=64)
    date_done = models.DateTimeField(_("saved at"), default=timezone.now, db_index=True)

    objects = GroupResultManager()

    class Meta:
        verbose_name = _("group result")
        verbose_name_plural = _("group results")

    def __str__(self) -> str:
        return f"<Group: {self.group_id}>"


class ChordCounterQuerySet(models.QuerySet):
    """The states of a chord's counter, and its transitions (see ``chords``)."""

    def of(self, group_id: str) -> ChordCounterQuerySet:
        return self.filter(group_id=group_id)

    def finished_before(self, cutoff: datetime) -> ChordCounterQuerySet:
        """Finished chords age by ``date_done``; unfinished ones never expire."""
        return self.filter(date_done__lt=cutoff)

    def held_by(self, token: str) -> ChordCounterQuerySet:
        """The chord while ``token`` holds its claim (claimed_by has no index: InnoDB still
        reaches the row through group_id). Only the holder finishes a chord, so a held
        chord is unfinished unless the holder finished it itself."""
        return self.filter(claimed_by=token)

    # -- transitions (one statement each) -------------------------------------------
    # Every chord transaction starts with one of these UPDATEs, on ``of(group_id)`` alone:
    # the counter's row lock (SQLite's write lock) is the first lock it takes, and InnoDB
    # always reaches the row through the group_id index (a condition on date_done let it
    # lock through that index instead: a count and ``set_chord_size`` deadlocked). Other
    # conditions are a CASE in the SET, decided on the locked row, or on unindexed columns
    # (``held_by``). Never an upsert of an existing counter: InnoDB's takes a shared lock
    # before its exclusive one.

    def restart(self, now: datetime) -> int:
        """A frozen chord applied again: counted from zero, unclaimed, unfinished."""
        return self.update(
            count=0,
            total=None,
            added=0,
            date_created=now,
            claimed_by=None,
            date_claimed=None,
            date_done=None,
        )

    def resize(self, total: int) -> int:
        """``set_chord_size``: how many parts the header has."""
        return self.update(total=total)

    def add_part(self) -> int:
        """One more part finished, counted on an unfinished chord only."""
        return self.update(count=_if_unfinished("count", F("count") + 1))

    def take_back_part(self) -> int:
        """The part just added had been counted before."""
        return self.update(count=F("count") - 1)

    def grow(self, parts: int = 1) -> int:
        """``Task.add_to_chord``: an unfinished chord waits for ``parts`` more (counted apart
        from the header's size, which Celery 5.7 may set after them)."""
        return self.update(added=_if_unfinished("added", F("added") + parts))

    def claim(self, token: str, now: datetime) -> int:
        """Take the right to complete the chord (see ``ChordCounter.is_claimable``)."""
        return self.update(claimed_by=token, date_claimed=now)

    def renew(self, now: datetime) -> int:
        """Refresh the claim (on ``held_by(token)``)."""
        return self.update(date_claimed=now)

    def finish(self, now: datetime) -> int:
        """The body was sent or the chord failed (on ``held_by(token)``): late copies of
        parts now do nothing."""
        return self.update(date_done=now)


def _if_unfinished(column: str, then: Any) -> Case:
    """``then`` on an unfinished chord; the column unchanged otherwise."""
    return _only_if(Q(date_done__isnull=True), column, then)


def _only_if(condition: Q, column: str, then: Any) -> Case:
    field = ChordCounter._meta.get_field(column)
    return Case(When(condition, then=then), default=F(column), output_field=field)


class ChordCounter(models.Model):
    """One chord's progress: header parts counted, who completes it, when it finished.

    The protocol is in ``django_celery_fulldbresult.chords`` (and docs/design.md, "Chords").
    A finished chord keeps its row (``date_done`` set) so that a late copy of a header part
    finds it finished and does nothing; finished rows expire like results.
    """

    id = models.BigAutoField(primary_key=True)
    group_id = models.CharField(max_length=255, unique=True)
    count = models.PositiveIntegerField(default=0)
    # The header's size (``set_chord_size``), and the parts added by header tasks
    # (``Task.add_to_chord``): kept apart, since Celery sets the size just before sending the
    # last header task, when an earlier one may already have added parts.
    total = models.PositiveIntegerField(null=True)
    added = models.PositiveIntegerField(default=0)
    date_created = models.DateTimeField(default=timezone.now, db_index=True)
    # The part that completes the chord claims it (a token per call) before it sends the
    # body; a claim older than the lease may be taken over by a later copy of a part.
    claimed_by = models.CharField(max_length=64, null=True, blank=True)
    date_claimed = models.DateTimeField(null=True, blank=True)
    date_done = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = TaskDatabaseManager.from_queryset(ChordCounterQuerySet)()

    def __str__(self) -> str:
        return f"<Chord: {self.group_id} {self.count}/{self.expected()}>"

    def expected(self, fallback_total: int | None = None) -> int | None:
        """Parts to wait for: the header's size (from ``set_chord_size``, else
        ``fallback_total``, the size the part's request carries) and the parts added."""
        total = self.total if self.total is not None else fallback_total
        return None if total is None else total + self.added

    def is_complete(self, fallback_total: int | None = None) -> bool:
        """Every part counted."""
        expected = self.expected(fallback_total)
        return expected is not None and self.count >= expected

    def is_claimable(self, token: str, stale_before: datetime) -> bool:
        """Not claimed, claimed by ``token`` already (a retried call), or claimed by a call
        whose lease ran out before ``stale_before``."""
        if self.claimed_by in (None, token):
            return True
        return self.date_claimed is None or self.date_claimed < stale_before


class ChordPartQuerySet(models.QuerySet):
    def of(self, group_id: str) -> ChordPartQuerySet:
        return self.filter(group_id=group_id)


class ChordPart(models.Model):
    """A header part already counted: each (task id, group index) counts once."""

    id = models.BigAutoField(primary_key=True)
    group_id = models.CharField(max_length=255)
    task_id = models.CharField(max_length=255)
    #: The part's index in the header (Celery's ``group_index``); -1 when the message had none.
    group_index = models.IntegerField(default=-1)

    objects = TaskDatabaseManager.from_queryset(ChordPartQuerySet)()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["group_id", "task_id", "group_index"], name="fdr_chord_part_once"
            )
        ]

    def __str__(self) -> str:
        return f"<Chord part: {self.group_id} {self.task_id}[{self.group_index}]>"


class WorkerHeartbeat(models.Model):
    """The last sign of life of each worker; tells a long task from a lost one."""

    id = models.BigAutoField(primary_key=True)
    hostname = models.CharField(max_length=255, unique=True)
    pid = models.PositiveIntegerField(null=True)
    last_seen = models.DateTimeField(db_index=True)
    #: When this worker (this boot of it) started: a row it took before is its own only if
    #: taken after that (a worker restarted under the same name did not take it).
    started = models.DateTimeField(null=True)

    objects = TaskDatabaseManager()

    def __str__(self) -> str:
        return f"<Worker: {self.hostname} seen {self.last_seen}>"


class StatsHourQuerySet(models.QuerySet):
    def between(self, first: datetime, end: datetime) -> StatsHourQuerySet:
        """The hours starting at ``first`` or later and before ``end``."""
        return self.filter(hour__gte=first, hour__lt=end)

    def aged(self, cutoff: datetime) -> StatsHourQuerySet:
        """Hours that started before ``cutoff``: past any window ``stats()`` reads them for."""
        return self.filter(hour__lt=cutoff)


class StatsHour(models.Model):
    """An hour whose finished rows ``stats()`` has counted (``rollups``): its counts are the
    ``StatsHourCount`` rows pointing here; an hour without any has none to count."""

    #: Start of the hour (UTC with ``USE_TZ``, else the naive clock's hour).
    hour = models.DateTimeField(primary_key=True)
    sealed_at = models.DateTimeField(default=timezone.now)

    objects = TaskDatabaseManager.from_queryset(StatsHourQuerySet)()

    def __str__(self) -> str:
        return f"<Stats hour: {self.hour}>"


class StatsHourCount(models.Model):
    """The rows of one task name and final state done in a sealed hour."""

    id = models.BigAutoField(primary_key=True)
    hour = models.ForeignKey(StatsHour, on_delete=models.CASCADE, related_name="counts")
    task = models.CharField(max_length=255)
    status = models.CharField(max_length=50)
    count = models.PositiveBigIntegerField()

    objects = TaskDatabaseManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["hour", "task", "status"], name="fdr_stats_hour_once")
        ]

    def __str__(self) -> str:
        return f"<Stats: {self.hour_id} {self.task} {self.status} x{self.count}>"


class StatsHourRunTimes(models.Model):
    """The runs (SUCCESS and FAILURE rows with a start) of one task name done in a sealed
    hour whose run time falls in one histogram bin (``rollups.bin_of``)."""

    id = models.BigAutoField(primary_key=True)
    hour = models.ForeignKey(StatsHour, on_delete=models.CASCADE, related_name="run_times")
    task = models.CharField(max_length=255)
    bin = models.SmallIntegerField()
    runs = models.PositiveBigIntegerField()

    objects = TaskDatabaseManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["hour", "task", "bin"], name="fdr_stats_bin_once")
        ]

    def __str__(self) -> str:
        return f"<Run times: {self.hour_id} {self.task} bin {self.bin} x{self.runs}>"
