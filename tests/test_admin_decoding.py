"""The admin never unpickles (issue 13): with pickle accepted by the app, a row anyone with
write access to the table could forge must not run code in the web process when the admin
shows it, retries it or sends it now."""

from __future__ import annotations

import base64
import datetime
import pickle
import uuid
from pathlib import Path

import pytest
from celery import states
from django.urls import reverse
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED
from django_celery_fulldbresult.models import TaskResultMeta

from .test_admin import act, held_messages, make_row, texts

pytestmark = pytest.mark.django_db(transaction=True)

PICKLE = "application/x-python-serialize"


class Touch:
    """Unpickling it creates a file: proof that the payload was decoded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture
def pickle_accepted(celery_app):
    before = celery_app.conf.accept_content, celery_app.backend.accept
    celery_app.conf.accept_content = ["json", "pickle"]
    celery_app.backend.accept = {"application/json", PICKLE}
    held_messages(celery_app)
    yield celery_app
    celery_app.conf.accept_content, celery_app.backend.accept = before
    held_messages(celery_app)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / f"unpickled-{uuid.uuid4().hex}"


def _forged(marker: Path, **values) -> TaskResultMeta:
    forged = {
        "args": None,
        "kwargs": None,
        "packed_args": pickle.dumps([[Touch(marker)], {}]),
        "packed_args_content_type": PICKLE,
        "result": base64.b64encode(pickle.dumps(Touch(marker))).decode(),
        "content_type": PICKLE,
        "content_encoding": "binary",
    }
    return make_row(**{**forged, **values})


def test_the_detail_page_shows_what_it_does_not_decode(admin_client, pickle_accepted, marker):
    row = _forged(marker, status=states.SUCCESS)
    page = admin_client.get(
        reverse("admin:django_celery_fulldbresult_taskresultmeta_change", args=[row.pk])
    )
    assert page.status_code == 200
    assert not marker.exists()
    html = page.content.decode()
    assert f"stored as {PICKLE}" in html and "not decoded here" in html


def test_retry_of_a_pickled_call_is_left_to_the_scheduler(
    admin_client, pickle_accepted, marker, settings
):
    row = _forged(marker, status=states.FAILURE)
    response = act(admin_client, "retry_tasks", [row])
    assert any("not decoded here" in m and "not retried" in m for m in texts(response))
    assert not TaskResultMeta.objects.filter(retried_from=row.task_id).exists()

    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True  # a sender will send it
    page = act(admin_client, "retry_tasks", [row], confirm=False)
    assert "wait for the scheduler&#x27;s sender" in page.content.decode()
    response = act(admin_client, "retry_tasks", [row])
    assert "Retried 1 of 1 selected tasks." in texts(response)
    copy = TaskResultMeta.objects.get(retried_from=row.task_id)
    assert copy.status == SCHEDULED and copy.eta <= timezone.now()
    assert bytes(copy.packed_args) == bytes(row.packed_args)  # copied, never decoded
    assert not marker.exists()
    assert held_messages(pickle_accepted) == []  # nothing published by the web process


def test_send_now_of_a_pickled_call_makes_it_due_for_the_sender(
    admin_client, pickle_accepted, marker
):
    later = timezone.now() + datetime.timedelta(hours=1)
    row = _forged(marker, status=SCHEDULED, eta=later, result=None, content_type=None)
    response = act(admin_client, "send_scheduled_now", [row])
    assert any("due now" in m for m in texts(response))
    row.refresh_from_db()
    assert row.status == SCHEDULED and row.eta <= timezone.now()
    assert not marker.exists()
    assert held_messages(pickle_accepted) == []
