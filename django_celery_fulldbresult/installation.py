"""Refuse to run when the package is used without being in ``INSTALLED_APPS``.

Django runs the system checks of installed apps only, and a project that forgot the app
imports nothing of ours until Celery loads the result backend (a worker starting, the first
``delay()`` or result read of a web process): ``manage.py check`` cannot see the mistake
(docs/ref/checks.rst). The models module calls ``require_installed()`` before declaring the
models, so that first use fails with this message instead of Django's ``RuntimeError``
about a model class outside ``INSTALLED_APPS``.
"""

from __future__ import annotations

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured

APP = "django_celery_fulldbresult"

E_NOT_INSTALLED = f"""\
django-celery-fulldbresult is used (CELERY_RESULT_BACKEND = \
"{APP}.result_backends:DatabaseResultBackend", or one of its modules imported) but \
'{APP}' is not in INSTALLED_APPS. Add '{APP}' to INSTALLED_APPS and run \
`python manage.py migrate`."""


def require_installed() -> None:
    """Raise ``ImproperlyConfigured`` unless the app is in ``INSTALLED_APPS`` (once Django's
    app registry is loaded; before that Django's own ``AppRegistryNotReady`` applies)."""
    if not apps.is_installed(APP):
        raise ImproperlyConfigured(E_NOT_INSTALLED)
