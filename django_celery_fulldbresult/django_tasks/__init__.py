"""Django's Tasks framework (``django.tasks``, or the ``django-tasks`` backport) on Celery.

``TASKS = {"default": {"BACKEND": "django_celery_fulldbresult.django_tasks.CeleryBackend"}}``
and functions decorated with Django's ``@task`` run on the project's Celery workers, each
with its full row (the how-to: docs/howto/django-tasks.rst). Modules:

* ``compat``: ``django.tasks`` or the backport, whichever is there;
* ``options``: ``CeleryTask``, Django's ``Task`` with the Celery options it may declare;
* ``backend``: ``CeleryBackend`` (enqueue, get_result, the capability flags, checks);
* ``runner``: the Celery task that runs each Django task, and Django's signals;
* ``results``: a row as a ``TaskResult`` (the status mapping).
"""

from .backend import CeleryBackend
from .options import CELERY_OPTIONS, CeleryTask

__all__ = ["CELERY_OPTIONS", "CeleryBackend", "CeleryTask"]
