"""Every admin action checks its own permission (issue 13): called directly, and through
a ModelAdmin subclass whose ``get_actions`` offers every action to everybody. Removing any
action's own check fails these tests."""

from __future__ import annotations

import datetime

import pytest
from celery import states
from django.contrib import admin
from django.contrib.messages.storage.fallback import FallbackStorage
from django.core.exceptions import PermissionDenied
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED
from django_celery_fulldbresult.admin import actions
from django_celery_fulldbresult.db import writing_first
from django_celery_fulldbresult.models import TaskResultMeta

from .beat_support import needs_beat
from .test_admin import ACTIONS, HELD, client_for, grant, held_messages, make_row, staff  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

FUNCTIONS = {function.__name__: function for function in actions.ACTIONS}


@pytest.fixture(autouse=True)
def _nothing_held(celery_app):
    held_messages(celery_app)  # what an earlier test sent there


def _targets() -> list[TaskResultMeta]:
    """A row each action would act on if allowed: scheduled (cancel, send now, revoke)
    and failed (retry)."""
    due = timezone.now() + datetime.timedelta(hours=1)
    return [
        make_row(status=SCHEDULED, eta=due, queue=HELD),
        make_row(status=states.FAILURE, queue=HELD),
    ]


def _unchanged(rows: list[TaskResultMeta], count: int, app) -> None:
    assert TaskResultMeta.objects.count() == count  # no copy of a retry
    for target in rows:
        assert TaskResultMeta.objects.get(pk=target.pk).status == target.status
    assert held_messages(app) == []  # nothing sent


def _request(user, action: str, rows):
    data = {"action": action, "_selected_action": [r.pk for r in rows], "post": "yes"}
    request = RequestFactory().post("/", data)
    request.user = user
    request.session = {}
    request._messages = FallbackStorage(request)
    return request


def test_the_module_lists_every_action():
    assert set(FUNCTIONS) == set(ACTIONS)


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_an_action_called_directly_checks_its_permission(staff, action, celery_app):  # noqa: F811
    grant(staff, *(ACTIONS[other] for other in set(ACTIONS) - {action}))
    rows = _targets()
    count = TaskResultMeta.objects.count()
    modeladmin = admin.site._registry[TaskResultMeta]
    queryset = TaskResultMeta.objects.filter(pk__in=[r.pk for r in rows])
    with pytest.raises(PermissionDenied):
        FUNCTIONS[action](modeladmin, _request(staff, action, rows), queryset)
    _unchanged(rows, count, celery_app)

    grant(staff, ACTIONS[action])  # the same call with the permission goes through
    staff = type(staff).objects.get(pk=staff.pk)  # permissions are cached per instance
    FUNCTIONS[action](modeladmin, _request(staff, action, rows), queryset)


@pytest.mark.urls("tests.loose_admin_urls")
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_subclass_offering_every_action_still_refuses_it(staff, action, celery_app):  # noqa: F811
    grant(staff, *(ACTIONS[other] for other in set(ACTIONS) - {action}))
    rows = _targets()
    count = TaskResultMeta.objects.count()
    client = client_for(staff)
    url = reverse("loose:django_celery_fulldbresult_taskresultmeta_changelist")
    assert f'value="{action}"' in client.get(url).content.decode()  # offered...
    for confirm in (False, True):
        data = {"action": action, "_selected_action": [r.pk for r in rows]}
        if confirm:
            data["post"] = "yes"
        response = client.post(url, data)
        assert response.status_code == 403  # ... and refused
    _unchanged(rows, count, celery_app)


@pytest.fixture
def nightly():
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    with writing_first("default"):  # see test_admin.periodic
        every = IntervalSchedule.objects.create(every=1, period="days")
        return PeriodicTask.objects.create(
            name="nightly", task="testproject.demo.tasks.echo", interval=every, queue=HELD
        )


@pytest.fixture
def beat_viewer(staff):  # noqa: F811
    grant(staff, "view_periodictask", *ACTIONS.values())
    return staff


@needs_beat
def test_beat_run_now_called_directly_checks_its_permission(beat_viewer, nightly, celery_app):
    from django_celery_beat.models import PeriodicTask

    from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin

    modeladmin = CustomPeriodicTaskAdmin(PeriodicTask, admin.site)
    modeladmin.celery_app_override = celery_app
    queryset = PeriodicTask.objects.filter(pk=nightly.pk)
    with pytest.raises(PermissionDenied):
        modeladmin.run_now(_request(beat_viewer, "run_now", [nightly]), queryset)
    assert held_messages(celery_app) == []


@needs_beat
@pytest.mark.urls("tests.loose_admin_urls")
def test_beat_run_now_in_a_subclass_offering_it_is_still_refused(beat_viewer, nightly, celery_app):
    client = client_for(beat_viewer)
    url = reverse("loose:django_celery_beat_periodictask_changelist")
    assert 'value="run_now"' in client.get(url).content.decode()
    response = client.post(
        url, {"action": "run_now", "_selected_action": [nightly.pk], "post": "yes"}
    )
    assert response.status_code == 403
    assert held_messages(celery_app) == []


# -- the audit trail -------------------------------------------------------------------


def _history(obj) -> list[str]:
    from django.contrib.admin.models import LogEntry
    from django.contrib.contenttypes.models import ContentType

    kind = ContentType.objects.get_for_model(type(obj))
    entries = LogEntry.objects.filter(content_type=kind, object_id=str(obj.pk)).order_by("pk")
    return [f"{entry.user.username}|{entry.get_change_message()}" for entry in entries]


def test_every_action_is_in_the_objects_history(admin_client, admin_user, celery_app):
    from .test_admin import act

    due = timezone.now() + datetime.timedelta(hours=1)
    failed = make_row(status=states.FAILURE, queue=HELD)
    waiting = [make_row(status=SCHEDULED, eta=due, queue=HELD) for _ in range(3)]
    act(admin_client, "retry_tasks", [failed])
    copy = TaskResultMeta.objects.get(retried_from=failed.task_id)
    act(admin_client, "cancel_scheduled_tasks", [waiting[0]])
    act(admin_client, "send_scheduled_now", [waiting[1]])
    act(admin_client, "revoke_tasks", [waiting[2], waiting[0]])

    assert _history(failed) == [f"admin|Retry: retried as {copy.task_id}"]
    assert _history(waiting[0]) == [
        "admin|Cancel: cancelled",
        "admin|Revoke: already finished (REVOKED)",
    ]
    assert _history(waiting[1]) == ["admin|Send now: sent now"]
    assert _history(waiting[2]) == ["admin|Revoke: cancelled before it was sent"]
    # ... and on the History page of the row, which a view-only operator can read.
    page = admin_client.get(
        reverse("admin:django_celery_fulldbresult_taskresultmeta_history", args=[failed.pk])
    )
    assert f"Retry: retried as {copy.task_id}" in page.content.decode()


@needs_beat
def test_beat_run_now_is_in_the_periodic_tasks_history(admin_client, celery_app, nightly):
    from .test_admin import texts

    url = reverse("admin:django_celery_beat_periodictask_changelist")
    response = admin_client.post(
        url, {"action": "run_now", "_selected_action": [nightly.pk], "post": "yes"}, follow=True
    )
    assert any("sent as" in m for m in texts(response))
    (entry,) = _history(nightly)
    assert entry.startswith("admin|Run now: sent as ")
