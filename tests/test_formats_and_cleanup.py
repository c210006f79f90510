"""Result column formats (USE_JSON, FORCE_JSON, pickle), secret tasks, expiry cleanup."""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from fractions import Fraction

import pytest
from celery import states
from django.db.models.signals import post_delete, pre_delete
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from kombu.exceptions import ContentDisallowed

from django_celery_fulldbresult import db, serialization
from django_celery_fulldbresult.models import GroupResultMeta, TaskResultMeta
from django_celery_fulldbresult.result_backends import DatabaseResultBackend
from testproject.demo import tasks

from .test_publish_tracking import NOBODY, drain

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.usefixtures("worker")
class TestUnserialisableResults:
    def test_without_force_json_the_task_fails_with_a_clear_error(self, settings):
        settings.DJANGO_CELERY_FULLDBRESULT_USE_JSON = True
        result = tasks.unserialisable.delay()
        with pytest.raises(Exception, match="cannot encode object as JSON"):
            result.get(timeout=20)
        row = TaskResultMeta.objects.get(task_id=result.id)
        assert row.status == states.FAILURE and "EncodeError" in row.traceback

    def test_with_force_json_the_string_form_is_stored(self, settings):
        settings.DJANGO_CELERY_FULLDBRESULT_USE_JSON = True
        settings.DJANGO_CELERY_FULLDBRESULT_FORCE_JSON = True
        result = tasks.unserialisable.delay()
        value = result.get(timeout=20)
        assert value["forced_json"] is True and value["value"].startswith("<object object")
        row = TaskResultMeta.objects.get(task_id=result.id)
        assert row.status == states.SUCCESS and row.content_type == "application/json"


def test_use_json_stores_plain_json_whatever_the_result_serializer(celery_app, settings):
    settings.DJANGO_CELERY_FULLDBRESULT_USE_JSON = True
    backend = DatabaseResultBackend(app=celery_app, serializer="pickle", accept=["pickle", "json"])
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"user": 5, "ok": True}, states.SUCCESS)
    row = TaskResultMeta.objects.get(task_id=task_id)
    assert row.content_type == "application/json"
    assert row.result == '{"user":5,"ok":true}'
    failed_id = str(uuid.uuid4())
    backend.mark_as_failure(failed_id, KeyError("k"))
    assert TaskResultMeta.objects.get(task_id=failed_id).content_type == "application/json"
    assert isinstance(backend.get_result(failed_id), KeyError)


def test_pickle_is_never_decoded_unless_accepted(celery_app):
    writer = DatabaseResultBackend(app=celery_app, serializer="pickle", accept=["pickle"])
    task_id = str(uuid.uuid4())
    writer.store_result(task_id, Fraction(1, 3), states.SUCCESS)
    row = TaskResultMeta.objects.get(task_id=task_id)
    assert row.content_type == "application/x-python-serialize"
    json_only = DatabaseResultBackend(app=celery_app, accept=["json"])
    with pytest.raises(ContentDisallowed):
        json_only.get_task_meta(task_id)
    with pytest.raises(ContentDisallowed):
        row.get_result(accept=["json"])
    assert row.get_result(accept=["pickle"]) == Fraction(1, 3)


def test_arguments_json_cannot_hold_are_packed_with_a_serializer_the_app_accepts(celery_app):
    """A pickle call in an app that accepts pickle: packed with pickle, never lost."""
    accepted = celery_app.conf.accept_content
    celery_app.conf.accept_content = ["json", "pickle"]
    try:
        result = tasks.echo.apply_async(
            (Fraction(1, 3),), {"n": Fraction(2, 3)}, serializer="pickle", queue=NOBODY
        )
    finally:
        celery_app.conf.accept_content = accepted
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.args is None and row.packed_args is not None
    assert row.get_call(accept=["pickle"]) == ([Fraction(1, 3)], {"n": Fraction(2, 3)})
    with pytest.raises(ContentDisallowed):
        row.get_call(accept=["json"])
    drain(celery_app)


def test_a_serializer_the_app_does_not_accept_is_never_introduced(celery_app, caplog):
    """The same call in a JSON-only app: the row keeps the reprs, and says it cannot be
    replayed, instead of holding a pickle nobody may read."""
    result = tasks.echo.apply_async((Fraction(1, 3),), serializer="pickle", queue=NOBODY)
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.packed_args is None and row.args is None and not row.replayable
    assert row.argsrepr == "(1/3,)"  # what the message showed
    assert "with a serializer the app accepts" in caplog.text
    drain(celery_app)


@pytest.mark.usefixtures("worker")
def test_nan_infinity_and_nul_are_kept_exactly_on_every_path(celery_app):
    """Values a JSON message carries but a JSON column cannot (NaN, Infinity, NUL): the
    publish record and the worker's writes keep them as the message's own JSON, the
    result too, and the reprs stay storable (PostgreSQL text refuses a raw NUL)."""
    args = ["a\x00b", math.inf]
    result = tasks.echo.apply_async(args, {"ratio": math.nan})
    returned = result.get(timeout=20)
    assert returned["args"] == args and math.isnan(returned["kwargs"]["ratio"])
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.packed_args_content_type == "application/json"
    stored_args, stored_kwargs = row.get_call(accept=["json"])
    assert stored_args == args and math.isnan(stored_kwargs["ratio"])
    assert "\x00" not in row.argsrepr and "\\x00" in row.argsrepr


def test_serialization_helpers_for_manual_replay():
    row_args = serialization.dumps([1, "a", uuid.UUID(int=1)])
    assert serialization.loads(row_args) == [1, "a", uuid.UUID(int=1)]
    assert serialization.loads([1, 2]) == [1, 2]  # a JSON column hands back decoded values
    with pytest.raises(TypeError):
        serialization.dumps(object())
    with pytest.raises(TypeError):
        serialization.loads("{not json")


@pytest.mark.usefixtures("worker")
def test_secret_tasks_keep_no_arguments(celery_app):
    result = tasks.charge_card.delay("4111111111111111", 10)
    assert result.get(timeout=20) == "charged 10"
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert (row.args, row.kwargs, row.packed_args, row.replayable) == (None, None, None, False)
    assert "4111" not in (row.argsrepr or "") and row.argsrepr == "<2 hidden>"
    custom = tasks.charge_card.apply_async(("4111111111111111", 3), argsrepr="('****', 3)")
    custom.get(timeout=20)
    assert TaskResultMeta.objects.get(task_id=custom.id).argsrepr == "('****', 3)"


def test_secret_tasks_by_setting(settings, celery_app):
    settings.DJANGO_CELERY_FULLDBRESULT_SECRET_TASKS = ["testproject.demo.tasks.ad*"]
    result = tasks.add.apply_async((1, 2), queue=NOBODY)
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.args is None and not row.replayable
    drain(celery_app)


def _row(status: str, age: timedelta, done: bool) -> TaskResultMeta:
    when = timezone.now() - age
    return TaskResultMeta(
        task_id=str(uuid.uuid4()),
        task="demo",
        status=status,
        date_modified=when,
        date_done=when if done else None,
    )


@pytest.mark.usefixtures("worker")
def test_backend_cleanup_deletes_only_old_final_rows_in_batches(celery_app, settings, task_db):
    settings.DJANGO_CELERY_FULLDBRESULT_CLEANUP_BATCH_SIZE = 7
    old, young = timedelta(days=3), timedelta(hours=1)
    expired = [_row(s, old, True) for s in (states.SUCCESS, states.FAILURE, states.REVOKED) * 10]
    kept = [_row(s, young, True) for s in (states.SUCCESS, states.FAILURE)]
    # Unfinished rows are never deleted, even with a (bogus) old date_done.
    kept += [
        _row(s, old, done)
        for s in (states.PENDING, states.STARTED, states.RETRY, "SCHEDULED", "PROGRESS")
        for done in (False, True)
    ]
    TaskResultMeta.objects.bulk_create(expired + kept)
    GroupResultMeta.objects.create(
        group_id="g-old",
        result="{}",
        content_type="application/json",
        content_encoding="utf-8",
        date_done=timezone.now() - old,
    )
    signalled = []

    def receiver(sender, **kwargs):
        signalled.append(kwargs["instance"].pk)

    pre_delete.connect(receiver, sender=TaskResultMeta, weak=False)
    post_delete.connect(receiver, sender=TaskResultMeta, weak=False)
    try:
        celery_app.tasks["celery.backend_cleanup"].delay().get(timeout=30)
        backend = DatabaseResultBackend(app=celery_app)
        with CaptureQueriesContext(task_db) as queries:
            backend.cleanup()  # nothing left to delete: one statement per table
    finally:
        pre_delete.disconnect(receiver, sender=TaskResultMeta)
        post_delete.disconnect(receiver, sender=TaskResultMeta)
    remaining = set(TaskResultMeta.objects.values_list("task_id", flat=True))
    assert remaining >= {row.task_id for row in kept}
    assert not remaining & {row.task_id for row in expired}
    assert not GroupResultMeta.objects.filter(group_id="g-old").exists()
    assert signalled == []
    statements = [q["sql"] for q in queries if q["sql"] not in ("BEGIN", "COMMIT")]
    assert len(statements) == 3  # tasks, groups, finished chords


def test_delete_expired_statement_count(celery_app, task_db):
    """30 expired rows, batches of 7: 5 DELETE statements (4 full + 1 partial)."""
    TaskResultMeta.objects.bulk_create(
        [_row(states.SUCCESS, timedelta(days=3), True) for _ in range(30)]
    )
    with CaptureQueriesContext(task_db) as queries:
        deleted = TaskResultMeta.objects.delete_expired(
            timedelta(days=1), using=db.write_alias(), batch_size=7
        )
    assert deleted == 30 and len(queries) == 5
    assert all(q["sql"].startswith("DELETE") for q in queries)
