"""Functions written for Django's Tasks framework (``@task``), run by the Celery workers
through ``django_celery_fulldbresult.django_tasks.CeleryBackend`` (settings.TASKS)."""

from __future__ import annotations

import asyncio
import inspect

try:  # Django 6.0+
    from django.tasks import task
except ImportError:  # Django 4.2 / 5.2: the django-tasks backport
    from django_tasks import task

#: Django 6.0's @task takes no other keyword; 6.1 and the backport pass them to the backend.
TAKES_OPTIONS = any(
    parameter.kind is inspect.Parameter.VAR_KEYWORD
    for parameter in inspect.signature(task).parameters.values()
)


@task
def add(a, b):
    return a + b


@task
def fail(message):
    raise ValueError(message)


@task
def not_json():
    return {1, 2}


@task(takes_context=True)
def with_context(context, value):
    return {
        "attempt": context.attempt,
        "id": context.task_result.id,
        "args": context.task_result.args,
        "value": value,
    }


@task
async def async_add(a, b):
    await asyncio.sleep(0)
    return a + b


if TAKES_OPTIONS:

    @task(takes_context=True, autoretry_for=(ValueError,), max_retries=3, default_retry_delay=0)
    def flaky(context, failures):
        """Fails its first ``failures`` attempts; Celery retries it."""
        if context.attempt <= failures:
            raise ValueError(f"attempt {context.attempt}")
        return context.attempt

    @task(store_args=False)
    def secret(password):
        return len(password)

    @task(time_limit=30, soft_time_limit=20, acks_late=True)
    def limited():
        return "done"


@task
def needs_marker(marker):
    """Fails until a ``Run`` row with task_id ``marker`` exists: an operator fixes the cause,
    then retries it from the admin."""
    from testproject.demo.models import Run

    if not Run.objects.filter(task_id=marker).exists():
        raise LookupError(f"marker {marker!r} is missing")
    return marker


@task
def enqueues_another(a, b):
    """A task that enqueues one (Celery lists it among the parent's children)."""
    return add.enqueue(a, b).id


@task
def sleeps(seconds):
    import time

    time.sleep(seconds)
    return seconds
