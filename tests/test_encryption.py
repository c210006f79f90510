"""Arguments and results encrypted at rest (issue 13): nothing readable in any column, yet
the result API, Retry, Send now and the scheduler work; keys rotate."""

from __future__ import annotations

import pytest
from celery import chain
from celery.signals import task_prerun
from cryptography.fernet import Fernet

from django_celery_fulldbresult import encryption, replay, scheduler
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .conftest import wait_for
from .test_admin import act, texts
from .test_secrets import _every_stored_value, _leaks, _secret

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]

ECHO = "testproject.demo.tasks.echo"


@pytest.fixture
def key(settings) -> str:
    key = Fernet.generate_key().decode()
    settings.DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS = [key]
    settings.DJANGO_CELERY_FULLDBRESULT_ENCRYPTED_TASKS = [ECHO]
    settings.DJANGO_CELERY_FULLDBRESULT_ENCRYPT_RESULTS = True
    return key


def test_encrypted_calls_are_unreadable_and_still_retried(key, admin_client):
    card = _secret("enc")
    result = tasks.echo.delay(card, amount=10)
    assert result.get(timeout=20) == {"args": [card], "kwargs": {"amount": 10}}
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert (row.args, row.kwargs, row.replayable) == (None, None, True)
    assert encryption.is_sealed(row.packed_args_content_type)
    assert encryption.is_sealed(row.content_type)
    assert (row.argsrepr, row.kwargsrepr) == ("<1 hidden>", "<1 hidden>")
    assert _leaks([card], _every_stored_value()) == []

    # The admin shows neither, and its Retry sends the call exactly.
    page = admin_client.get(f"/admin/django_celery_fulldbresult/taskresultmeta/{row.pk}/change/")
    html = page.content.decode()
    assert "encrypted at rest" in html and _leaks([card], [("a", "b", html)]) == []
    response = act(admin_client, "retry_tasks", [row])
    assert "Retried 1 of 1 selected tasks." in texts(response)
    copy = TaskResultMeta.objects.get(retried_from=row.task_id)
    copied = tasks.echo.AsyncResult(copy.task_id).get(timeout=20)
    assert copied == {"args": [card], "kwargs": {"amount": 10}}


def test_an_encrypted_callback_in_another_row_is_sealed_and_sent_again(key, celery_app):
    card = _secret("callback")
    runs = []

    def ran(sender=None, args=None, **_):
        if sender is not None and sender.name == ECHO and list(args or ()) == [card]:
            runs.append(list(args))

    task_prerun.connect(ran, weak=False)
    try:
        result = chain(tasks.add.s(1, 2), tasks.echo.si(card)).apply_async()
        assert result.get(timeout=20) == {"args": [card], "kwargs": {}}
        add_row = TaskResultMeta.objects.get(task_id=result.parent.id)
        assert add_row.replayable
        assert encryption.SEALED_KEY in str(add_row.options)
        assert _leaks([card], _every_stored_value()) == []
        (outcome,) = replay.retry(celery_app, [add_row])
        assert outcome.sent
        copy = TaskResultMeta.objects.get(retried_from=add_row.task_id)
        assert tasks.add.AsyncResult(copy.task_id).get(timeout=20) == 3
        # The copy's chain ran the callback again, with its arguments opened.
        wait_for(lambda: len(runs) == 2)
        assert runs == [[card], [card]]
        assert sealed_in_row(copy)
    finally:
        task_prerun.disconnect(ran)


def sealed_in_row(row) -> bool:
    """The copy's row keeps the callback sealed too."""
    row.refresh_from_db()
    return encryption.SEALED_KEY in str(row.options)


def test_a_delayed_encrypted_call_is_held_and_forwarded(key, patched, celery_app):
    card = _secret("delayed")
    result = tasks.echo.apply_async((card,), countdown=3600)
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.status == "SCHEDULED" and encryption.is_sealed(row.packed_args_content_type)
    assert scheduler.send_now(celery_app, [result.id]) == {result.id: "sent"}
    assert result.get(timeout=20) == {"args": [card], "kwargs": {}}


def test_keys_rotate_and_a_missing_key_is_a_clear_error(key, settings):
    result = tasks.echo.delay("rotated")
    result.get(timeout=20)
    row = TaskResultMeta.objects.get(task_id=result.id)
    newer = Fernet.generate_key().decode()
    settings.DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS = [newer, key]
    assert row.get_call() == (["rotated"], {})
    settings.DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS = [newer]
    with pytest.raises(encryption.DecryptionError, match="was its key removed"):
        row.get_call()
    assert "cannot be decoded" in (replay.refusal(row) or "")
