"""Without django-celery-beat (on Django 6.1, which django-celery-beat 2.9 does not support,
or a project that did not install it) the beat features say why and what to do instead;
everything else works."""

from __future__ import annotations

import io

import pytest
from django.apps import apps
from django.contrib import admin
from django.core.management import CommandError, call_command
from django.urls import reverse

from django_celery_fulldbresult import beat

from .beat_support import without_beat


@pytest.fixture
def beat_left_out(monkeypatch):
    """django_celery_beat not in INSTALLED_APPS (whether or not it is installed)."""
    installed = apps.is_installed
    monkeypatch.setattr(
        apps, "is_installed", lambda name: name != "django_celery_beat" and installed(name)
    )


def test_setup_scheduler_beat_says_what_to_do(beat_left_out):
    with pytest.raises(CommandError, match=r"setup_scheduler_beat needs") as raised:
        call_command("setup_scheduler_beat", stdout=io.StringIO())
    assert ("INSTALLED_APPS" in str(raised.value)) or ("run_scheduler" in str(raised.value))


def test_the_beat_admin_class_says_what_to_do(beat_left_out):
    with pytest.raises(ImportError, match=r"CustomPeriodicTaskAdmin needs"):
        from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin  # noqa: F401


@without_beat
def test_on_a_django_beat_does_not_support_the_reason_names_it():
    reason = beat.unavailable("setup_scheduler_beat")
    if beat.django.VERSION[:2] >= beat.UNSUPPORTED_DJANGO:
        assert "no release supports Django" in reason and "run_scheduler" in reason
    else:
        assert "pip install 'django-celery-fulldbresult[beat]'" in reason
    with pytest.raises(CommandError) as raised:
        call_command("setup_scheduler_beat", stdout=io.StringIO())
    assert str(raised.value) == reason


@without_beat
def test_the_admin_works_without_beat(admin_client):
    assert not any(model._meta.app_label == "django_celery_beat" for model in admin.site._registry)
    url = reverse("admin:django_celery_fulldbresult_taskresultmeta_changelist")
    assert admin_client.get(url).status_code == 200
    assert admin_client.get(url + "?periodic_task_name=nightly").status_code == 200
