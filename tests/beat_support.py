"""django-celery-beat where it exists: the tests of the beat integration need it.

django-celery-beat 2.9 declares ``Django<6.1``, so on Django 6.1 pip does not install it
(``pip install -e '.[test]'`` without ``beat``): there the integration's tests are skipped and
the degraded behaviour is tested instead. On any other Django a missing beat fails the run.
"""

from __future__ import annotations

import importlib.util

import django
import pytest

from django_celery_fulldbresult.beat import UNSUPPORTED_DJANGO

INSTALLED = importlib.util.find_spec("django_celery_beat") is not None

if not INSTALLED and django.VERSION[:2] < UNSUPPORTED_DJANGO:
    raise ImportError(
        f"the tests need django-celery-beat on Django {django.get_version()}: "
        "pip install -e '.[test,beat]'"
    )

needs_beat = pytest.mark.skipif(
    not INSTALLED, reason="django-celery-beat does not support this Django (2.9: Django<6.1)"
)
without_beat = pytest.mark.skipif(INSTALLED, reason="django-celery-beat is installed")
