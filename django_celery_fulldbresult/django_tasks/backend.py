"""``CeleryBackend``: Django's Tasks framework on Celery workers, with the full record.

``enqueue`` writes the task's row (exact arguments, the time it was enqueued) and publishes
it; ``run_after`` makes it a SCHEDULED row the package's scheduler forwards when due (never
a broker ETA); ``get_result`` reads the row. The worker side is ``runner``.
"""

from __future__ import annotations

import inspect
from datetime import datetime
from functools import cached_property
from typing import Any

from celery import current_app
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from django.utils.module_loading import import_string

from .. import conf, db, publish, secrecy
from ..installation import APP
from ..models import TaskResultMeta
from ..result_backends import DatabaseResultBackend
from . import results, runner
from .compat import (
    DEFAULT_TASK_PRIORITY,
    DEFAULT_TASK_QUEUE_NAME,
    TASK_MAX_PRIORITY,
    TASK_MIN_PRIORITY,
    BaseTaskBackend,
    InvalidTask,
    TaskResult,
    TaskResultStatus,
    normalize_json,
    task_enqueued,
)
from .options import CeleryTask

#: Broker transports whose queues honour message priorities, by kombu ``driver_type``.
AMQP_DRIVERS = frozenset({"amqp", "pyamqp", "librabbitmq"})
REDIS_DRIVERS = frozenset({"redis"})
#: Redis (kombu's priority steps): 0 is served first, 9 last.
REDIS_PRIORITY_RANGE = (0, 9)


class CeleryBackend(BaseTaskBackend):
    """``TASKS = {"default": {"BACKEND": "django_celery_fulldbresult.django_tasks.CeleryBackend",
    "QUEUES": [...], "OPTIONS": {"CELERY_APP": "proj.celery.app"}}}``.

    ``QUEUES``: Django queue names a task may use; ``"default"`` is the Celery app's default
    queue (``task_default_queue``, or the task's route), any other name the Celery queue of
    that name. ``OPTIONS["CELERY_APP"]``: the dotted path of the project's Celery app
    (default: Celery's current app).
    """

    task_class = CeleryTask
    #: Async task functions run on the worker (``Task.call``: an event loop per call).
    supports_async_task = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        unknown = set(self.options) - {"CELERY_APP"}
        if unknown:
            raise ImproperlyConfigured(
                f"TASKS[{alias!r}]: unknown OPTIONS for {type(self).__name__}: {sorted(unknown)} "
                '(it takes "CELERY_APP")'
            )

    # -- what the backend can do, from the Celery app's configuration ------------------

    @cached_property
    def celery_app(self) -> Any:
        path = self.options.get("CELERY_APP")
        return import_string(path) if path else current_app  # Celery's proxy: followed

    @property
    def supports_defer(self) -> bool:  # type: ignore[override]
        """``run_after`` waits as a SCHEDULED row: only with the package's scheduler."""
        return bool(conf.get("SCHEDULE_ETA"))

    @property
    def supports_get_result(self) -> bool:  # type: ignore[override]
        return isinstance(self.celery_app.backend, DatabaseResultBackend)

    @property
    def supports_priority(self) -> bool:  # type: ignore[override]
        """Only where the broker orders a queue by priority: Redis, and RabbitMQ queues
        declared with a maximum priority (Celery's ``task_queue_max_priority``)."""
        return self.priority_range is not None

    @cached_property
    def driver(self) -> str:
        return self.celery_app.connection_for_write().transport.driver_type

    @property
    def priority_range(self) -> tuple[int, int] | None:
        """(the broker's least urgent priority, its most urgent), or None."""
        if self.driver in REDIS_DRIVERS:
            return REDIS_PRIORITY_RANGE[1], REDIS_PRIORITY_RANGE[0]
        maximum = self.celery_app.conf.task_queue_max_priority
        if self.driver in AMQP_DRIVERS and maximum:
            return 0, int(maximum)
        return None

    def broker_priority(self, priority: int) -> int | None:
        """Django's -100..100 (100 most urgent) onto the broker's own range, linearly; None
        where the broker has no priorities (only the default priority is accepted there)."""
        bounds = self.priority_range
        if bounds is None:
            return None
        low, high = bounds
        fraction = (priority - TASK_MIN_PRIORITY) / (TASK_MAX_PRIORITY - TASK_MIN_PRIORITY)
        return round(low + fraction * (high - low))

    # -- Django's interface ------------------------------------------------------------

    def validate_task(self, task: Any) -> None:
        """Django's rules, with the reason where the Celery setup decides; then the Celery
        task that runs ``task`` on the workers is registered (once per function:
        ``Task.using()`` copies share it)."""
        if task.priority != DEFAULT_TASK_PRIORITY and not self.supports_priority:
            raise InvalidTask(
                f"{task.module_path}: priority {task.priority} needs a broker that orders a "
                f"queue by priority (Redis, or RabbitMQ with CELERY_TASK_QUEUE_MAX_PRIORITY "
                f"set); this app's broker ({self.driver}) does not."
            )
        if task.run_after is not None and not self.supports_defer:
            raise InvalidTask(
                f"{task.module_path}: run_after waits in the database, never in the broker: "
                f"set {conf.PREFIX}SCHEDULE_ETA = True and run a sender (manage.py "
                "run_scheduler, or the send_scheduled_task beat entry)."
            )
        super().validate_task(task)
        runner.register(task)
        if task.run_after is not None and secrecy.is_secret(
            task.module_path, runner.celery_task(task, self.celery_app)
        ):
            raise InvalidTask(
                f"{task.module_path}: a secret task cannot wait in the database (its "
                "arguments are never stored there)."
            )

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        args, kwargs = normalize_json(list(args)), normalize_json(dict(kwargs))
        _check_arguments(task, args, kwargs)
        options = self.send_options(task)
        with publish.recorded_now() as written:
            sent = runner.celery_task(task, self.celery_app).apply_async(args, kwargs, **options)
        result = TaskResult(
            task=task,
            id=sent.id,
            status=TaskResultStatus.READY,
            enqueued_at=written.get("date_submitted") or timezone.now(),
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        task_enqueued.send(type(self), task_result=result)
        return result

    def send_options(self, task: Any) -> dict[str, Any]:
        """``apply_async`` options for one call of ``task``."""
        options: dict[str, Any] = {}
        if task.queue_name != DEFAULT_TASK_QUEUE_NAME:
            options["queue"] = task.queue_name
        priority = self.broker_priority(task.priority)
        if priority is not None:
            options["priority"] = priority
        if task.run_after is not None:
            options["eta"] = _aware(task.run_after)  # a SCHEDULED row (ScheduledTask)
        return options

    def get_result(self, result_id: str) -> TaskResult:
        if not self.supports_get_result:  # check E003
            raise NotImplementedError(
                f"The tasks backend {self.alias!r} reads results from the package's result "
                "backend, which its Celery app does not use."
            )
        row = db.run_with_reconnect(
            lambda using: (
                TaskResultMeta.objects.using(using)
                .filter(task_id=result_id)
                .values(*results.COLUMNS)
                .first()
            )
        )
        return results.from_row(self, row, result_id)

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        messages = list(super().check(**kwargs))
        if not self.supports_get_result:
            messages.append(
                checks.Error(
                    f"The tasks backend {self.alias!r} needs the package's result backend: "
                    f"the Celery app's result backend is {type(self.celery_app.backend).__name__}.",
                    hint='CELERY_RESULT_BACKEND = "django_celery_fulldbresult.result_backends:'
                    'DatabaseResultBackend"',
                    id=f"{APP}.E003",
                )
            )
        return messages


def _aware(value: datetime) -> datetime:
    return timezone.make_aware(value) if timezone.is_naive(value) else value


def _check_arguments(task: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """The call must fit the function: a clear error at enqueue, not a failure later on a
    worker (Celery checks its own tasks' calls the same way)."""
    signature = inspect.signature(task.func)
    try:
        if task.takes_context:
            signature.bind(None, *args, **kwargs)
        else:
            signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{task.module_path}{signature}: {exc}") from None
