"""The scheduler's Celery side: the ``ScheduledTask`` base class and the sender task."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from . import scheduler


class ScheduledTask(Task):
    """A task whose eta/countdown calls wait in the database, not in worker memory.

    ``@shared_task(base=ScheduledTask)``, or app-wide with
    ``Celery("proj", task_cls="django_celery_fulldbresult.tasks:ScheduledTask")``.
    Needs ``DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True``. Per call,
    ``apply_async(..., db_schedule="transaction")`` binds the call to the caller's
    transaction (delayed or not: transactional publish), ``db_schedule=True`` does not,
    and ``db_schedule=False`` keeps the broker's ETA (``scheduler.intercept``).
    """

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        app = self._get_app()
        if scheduler.is_installed(app):  # the app's send_task decides, for every call
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        db_schedule = scheduler.intercept.strip_option(options)
        # A delayed call, or one bound to the caller's transaction (transactional publish).
        if scheduler.intercept.may_hold(
            app, options.get("countdown"), options.get("eta"), db_schedule
        ):
            # The same options apply_async would hand to send_task.
            call = dict(self._get_exec_options(), **options)
            call.setdefault("ignore_result", self.ignore_result)
            if self.priority:
                call.setdefault("priority", self.priority)
            result = scheduler.maybe_schedule(
                app,
                self.name,
                args,
                kwargs,
                task_id=task_id,
                link=link,
                link_error=link_error,
                shadow=shadow,
                result_cls=self.AsyncResult,
                task_type=self,
                db_schedule=db_schedule,
                **call,
            )
            if result is not None:
                return result
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow, **options
        )


@shared_task(name="django_celery_fulldbresult.tasks.send_scheduled_task", ignore_result=True)
def send_scheduled_task(batch_size: int | None = None, max_seconds: float = 50.0) -> int:
    """Forward every due scheduled task (run it from django-celery-beat, e.g. every minute).

    Several copies may run at once (beat and ``run_scheduler`` daemons): claims
    never overlap. Returns how many tasks were sent.
    """
    from celery import current_app

    return scheduler.forward_due(current_app, batch_size, max_seconds=max_seconds).sent
