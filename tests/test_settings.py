"""The package's settings (``conf``): read once, read again whenever Django says one changed."""

from __future__ import annotations

from django.test import override_settings

from django_celery_fulldbresult import conf


def test_a_changed_setting_is_seen_at_once_and_its_old_value_after():
    before = conf.get("CLEANUP_BATCH_SIZE")
    with override_settings(DJANGO_CELERY_FULLDBRESULT_CLEANUP_BATCH_SIZE=before + 7):
        assert conf.get("CLEANUP_BATCH_SIZE") == before + 7
    assert conf.get("CLEANUP_BATCH_SIZE") == before


def test_a_setting_set_to_none_falls_back_to_its_default(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULER_BATCH_SIZE = 3
    assert conf.get("SCHEDULER_BATCH_SIZE") == 3
    # How a test simulates an unset setting (``del settings.X`` sends no setting_changed).
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULER_BATCH_SIZE = None
    assert conf.get("SCHEDULER_BATCH_SIZE") == conf.DEFAULTS["SCHEDULER_BATCH_SIZE"]


def test_other_settings_keep_what_was_read(settings):
    conf.get("CLEANUP_BATCH_SIZE")
    settings.USE_THOUSAND_SEPARATOR = True  # not ours: nothing to read again
    assert "CLEANUP_BATCH_SIZE" in conf._read
