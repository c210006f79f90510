"""The same, as a pytest-django user writes it (``pytest`` in this directory)."""

import uuid

import pytest
from celery import states
from celery.contrib.testing.worker import start_worker
from django.db import transaction
from shopsite.celery import app

from django_celery_fulldbresult.models import TaskResultMeta

from .tasks import add


@pytest.fixture(autouse=True)
def nothing_left_over(request):
    if "django_db" in request.keywords:
        assert list(TaskResultMeta.objects.values_list("task_id", "status")) == []


@pytest.mark.django_db
def test_a_result_stored_by_the_backend_is_visible_in_the_test():
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, 42, states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=5) == 42


@pytest.mark.django_db
def test_storing_to_a_row_the_test_holds_does_not_wait_on_itself():
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, None, states.STARTED)
    with transaction.atomic():
        TaskResultMeta.objects.select_for_update().get(task_id=task_id)
        app.backend.store_result(task_id, 7, states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=5) == 7


@pytest.mark.django_db
def test_publish_tracking_and_the_scheduler():
    published = add.delay(1, 2)
    delayed = add.apply_async((1, 2), countdown=3600)
    statuses = dict(TaskResultMeta.objects.values_list("task_id", "status"))
    assert statuses == {published.id: states.PENDING, delayed.id: "SCHEDULED"}


@pytest.mark.django_db(transaction=True)
def test_with_a_worker():
    # shutdown_timeout: over RabbitMQ, Celery's worker loop notices the stop only when its
    # poll returns, up to 10 s after the last message: start_worker's default timeout.
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30
    ):
        result = add.delay(2, 2)
        assert result.get(timeout=30) == 4
    assert TaskResultMeta.objects.get(task_id=result.id).status == states.SUCCESS


@pytest.mark.django_db
def test_nothing_left_by_the_worker_test():
    pass  # the autouse fixture checks
