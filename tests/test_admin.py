"""The task admin through Django's test client, with a real worker, database and broker."""

from __future__ import annotations

import datetime
import re
import uuid

import pytest
from celery import states
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_celery_fulldbresult import SCHEDULED, SCHEDULED_SENT, scheduler
from django_celery_fulldbresult.db import writing_first
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks
from testproject.demo.models import Run

from .beat_support import needs_beat
from .conftest import queue_name, take_messages, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "admin:django_celery_fulldbresult_taskresultmeta_changelist"
HELD = queue_name("admin-held")  # no worker consumes it: what is sent stays there
ACTIONS = {
    "retry_tasks": "retry_taskresultmeta",
    "cancel_scheduled_tasks": "cancel_taskresultmeta",
    "send_scheduled_now": "send_now_taskresultmeta",
    "revoke_tasks": "revoke_taskresultmeta",
}


def changelist(**params) -> str:
    url = reverse(CHANGELIST)
    return url + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")


def detail(row: TaskResultMeta) -> str:
    return reverse("admin:django_celery_fulldbresult_taskresultmeta_change", args=[row.pk])


def make_row(**values) -> TaskResultMeta:
    now = timezone.now()
    defaults = {
        "task_id": str(uuid.uuid4()),
        "task": "testproject.demo.tasks.add",
        "status": states.SUCCESS,
        "args": [1, 2],
        "kwargs": {},
        "date_submitted": now,
        "date_modified": now,
    }
    return TaskResultMeta.objects.create(**{**defaults, **values})


def row(task_id: str) -> TaskResultMeta:
    return TaskResultMeta.objects.get(task_id=task_id)


def act(client: Client, action: str, rows, confirm: bool = True, url: str | None = None, **extra):
    data = {"action": action, "_selected_action": [r.pk for r in rows], **extra}
    if confirm:
        data["post"] = "yes"
    return client.post(url or changelist(), data, follow=confirm)


def texts(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def held_messages(app, queue: str = HELD) -> list:
    return take_messages(app, queue)


@pytest.fixture(autouse=True)
def _empty_held_queue(celery_app):
    held_messages(celery_app)


@pytest.fixture
def staff(django_user_model):
    """A staff user who may only view task rows (plus the permissions a test adds)."""
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_taskresultmeta"))
    return user


def grant(user, *codenames: str) -> None:
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# -- changelist, filters, search ----------------------------------------------------


def test_changelist_lists_rows_with_visible_states(admin_client):
    done = make_row(hostname="w1@host")
    failed = make_row(status=states.FAILURE, task="testproject.demo.tasks.fail")
    response = admin_client.get(changelist())
    assert response.status_code == 200
    content = response.content.decode()
    assert done.task_id in content and failed.task_id in content
    assert re.search(r'class="fdr-state" style="background:#c62828[^>]*>FAILURE<', content)
    assert re.search(r'class="fdr-state" style="background:#2e7d32[^>]*>SUCCESS<', content)
    assert "w1@host" in content
    # Read-only: no add button, no delete action.
    assert "taskresultmeta/add/" not in content and 'value="delete_selected"' not in content


def test_filters(admin_client):
    old = timezone.now() - datetime.timedelta(hours=3)
    failed = make_row(status=states.FAILURE)
    other_name = make_row(task="testproject.demo.tasks.noop")
    periodic = make_row(periodic_task_name="nightly report")
    stuck = make_row(status=states.PENDING, date_modified=old, date_submitted=old)
    fresh = make_row(status=states.PENDING)

    def listed(**params) -> set[str]:
        response = admin_client.get(changelist(**params))
        assert response.status_code == 200
        return {r.task_id for r in response.context["cl"].result_list}

    assert listed(status="FAILURE") == {failed.task_id}
    assert listed(task="testproject.demo.tasks.noop") == {other_name.task_id}
    assert listed(periodic_task_name="nightly+report") == {periodic.task_id}
    assert stuck.task_id not in listed(submitted="1h")
    assert stuck.task_id in listed(submitted="24h")
    assert listed(stale="3600") == {stuck.task_id}
    assert fresh.task_id in listed(stale="") | listed()


def test_filter_choices_do_not_scan_the_table(admin_client):
    make_row(task="not.registered.anywhere")
    response = admin_client.get(changelist(task="also.not.registered"))
    content = response.content.decode()
    # Registered names and the current value are offered; names only found in rows are not.
    assert "testproject.demo.tasks.needs_marker" in content
    assert "also.not.registered" in content
    assert "not.registered.anywhere" not in content
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(changelist())
    assert not [q for q in queries if "DISTINCT" in q["sql"].upper()]


def test_search_exact_task_id_and_name_prefix(admin_client):
    target = make_row(task="billing.tasks.invoice")
    other = make_row(task="shop.tasks.ship")

    def found(term: str) -> set[str]:
        response = admin_client.get(changelist(q=term))
        return {r.task_id for r in response.context["cl"].result_list}

    assert found(target.task_id) == {target.task_id}
    assert found(target.task_id[:8]) == set()  # ids match exactly, not by prefix
    assert found("billing.") == {target.task_id}
    assert found("shop.tasks.s") == {other.task_id}
    assert found("tasks.invoice") == set()  # names match by prefix only


def test_changelist_queries_are_constant_and_never_count_the_table(admin_client):
    make_row()
    admin_client.get(changelist())  # warm caches (content types, sessions)

    def statements() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(changelist()).status_code == 200
        return [q["sql"] for q in queries]

    few = statements()
    for _ in range(150):
        make_row()
    many = statements()
    assert len(few) == len(many)
    counts = [sql for sql in many if "COUNT(" in sql.upper()]
    assert counts, "the paginator counts"
    # Only capped counts: COUNT over a LIMITed subquery (or PostgreSQL's estimate).
    assert all("LIMIT" in sql.upper() for sql in counts)
    # Every read of the task table is a page (PostgreSQL's estimate reads pg_class).
    table = connection.ops.quote_name(TaskResultMeta._meta.db_table)
    reads = [sql for sql in many if f"FROM {table}" in sql and "COUNT(" not in sql.upper()]
    assert reads and all(" LIMIT " in sql.upper() for sql in reads)


def test_paginator_says_when_the_count_is_capped(admin_client, monkeypatch):
    from django_celery_fulldbresult.admin import paginator

    monkeypatch.setattr(paginator.EstimatedCountPaginator, "count_limit", 5)
    for _ in range(7):
        make_row(status=states.FAILURE)
    content = admin_client.get(changelist(status="FAILURE")).content.decode()
    assert re.search(r"5\+\s+task states", content)


# -- detail page --------------------------------------------------------------------


def test_detail_page_pretty_prints_and_escapes_hostile_content(admin_client):
    hostile = "<script>alert('x')</script>"
    parent = make_row()
    obj = make_row(
        status=states.FAILURE,
        args=[hostile, 2],
        kwargs={"note": hostile, "when": datetime.datetime(2030, 1, 2, 3, 4, 5)},
        options={"headers": {"x": hostile}},
        result='{"exc_type": "ValueError", "exc_message": ["<script>alert(1)</script>"]}',
        content_type="application/json",
        content_encoding="utf-8",
        traceback=f"Traceback (most recent call last):\nValueError: {hostile}",
        parent_id=parent.task_id,
        meta={"children": [[["child-that-has-no-row", None], None]]},
    )
    response = admin_client.get(detail(obj))
    assert response.status_code == 200
    content = response.content.decode()
    assert "<script>alert" not in content
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in content
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content  # the result
    assert "ValueError: &lt;script&gt;" in content  # the traceback
    assert "&quot;note&quot;: &quot;&lt;script&gt;" in content  # kwargs, indented JSON
    assert "2030-01-02 03:04:05" in content  # typed values as text
    assert f'href="{detail(parent)}"' in content  # link to the parent's row
    assert "child-that-has-no-row" in content
    # View only: no form to save.
    assert 'name="_save"' not in content


def test_detail_links_the_original_and_its_copies(admin_client):
    original = make_row(status=states.FAILURE)
    copy = make_row(retried_from=original.task_id)
    content = admin_client.get(detail(original)).content.decode()
    assert f'href="{detail(copy)}"' in content
    content = admin_client.get(detail(copy)).content.decode()
    assert f'href="{detail(original)}"' in content


# -- permissions and CSRF -----------------------------------------------------------


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_action_needs_its_own_permission(staff, action):
    target = make_row(status=SCHEDULED, eta=timezone.now() + datetime.timedelta(hours=1))
    client = client_for(staff)
    content = client.get(changelist()).content.decode()
    assert f'value="{action}"' not in content
    before = TaskResultMeta.objects.count()

    def refused() -> None:
        for confirm in (False, True):
            response = act(client, action, [target], confirm=confirm)
            assert response.status_code in (200, 302, 403)
            assert "Yes," not in response.content.decode()
        assert TaskResultMeta.objects.count() == before
        assert row(target.task_id).status == SCHEDULED

    refused()  # no action at all
    grant(staff, *(ACTIONS[other] for other in set(ACTIONS) - {action}))
    refused()  # every action but this one
    response = act(client, action, [target])
    assert "No action selected." in texts(response)

    staff.user_permissions.clear()
    grant(staff, "view_taskresultmeta", ACTIONS[action])
    content = client.get(changelist()).content.decode()
    assert f'value="{action}"' in content
    # The other actions stay hidden.
    for other in set(ACTIONS) - {action}:
        assert f'value="{other}"' not in content


def test_posting_an_action_without_the_csrf_token_is_refused(admin_user):
    target = make_row(status=states.FAILURE)
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    before = TaskResultMeta.objects.count()
    response = act(client, "retry_tasks", [target], confirm=False)
    assert response.status_code == 403
    response = client.post(
        changelist(), {"action": "retry_tasks", "_selected_action": [target.pk], "post": "yes"}
    )
    assert response.status_code == 403
    assert TaskResultMeta.objects.count() == before


def test_dashboard_is_hooked_and_linked(admin_client, staff):
    url = reverse("admin:django_celery_fulldbresult_taskresultmeta_dashboard")
    assert url.endswith("/django_celery_fulldbresult/taskresultmeta/dashboard/")
    assert admin_client.get(url).status_code == 200
    assert f'href="{url}"' in admin_client.get(changelist()).content.decode()
    app_index = reverse("admin:app_list", args=["django_celery_fulldbresult"])
    assert f'href="{url}"' in admin_client.get(app_index).content.decode()
    # Not for anonymous users.
    assert Client().get(url).status_code == 302


# -- retry --------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_retry_a_failed_task_runs_a_copy_on_the_worker(admin_client):
    result = tasks.needs_marker.delay("m-1")
    wait_for(lambda: row(result.id).status == states.FAILURE)
    Run.objects.create(task_id="m-1", pid=0)  # the operator fixes the cause
    original = row(result.id)

    page = act(admin_client, "retry_tasks", [original], confirm=False)
    content = page.content.decode()
    assert 'name="post" value="yes"' in content and 'value="Yes, retry 1 task"' in content
    assert TaskResultMeta.objects.filter(retried_from=original.task_id).count() == 0

    response = act(admin_client, "retry_tasks", [original])
    copy = TaskResultMeta.objects.get(retried_from=original.task_id)
    assert copy.task_id != original.task_id
    assert any(copy.task_id in text and "retried as" in text for text in texts(response))
    wait_for(lambda: row(copy.task_id).status == states.SUCCESS)
    copy = row(copy.task_id)
    assert (copy.args, copy.get_result()) == (["m-1"], "m-1")
    assert row(original.task_id).status == states.FAILURE  # the original stays as it was


def test_retry_keeps_routing_and_options(admin_client, celery_app):
    sent = tasks.add.apply_async(
        (1, 2), queue=HELD, priority=3, headers={"tenant": "acme"}, link=tasks.noop.si()
    )
    assert len(held_messages(celery_app)) == 1  # the original message
    act(admin_client, "retry_tasks", [row(sent.id)])
    (message,) = held_messages(celery_app)
    copy = TaskResultMeta.objects.get(retried_from=sent.id)
    assert message.headers["id"] == copy.task_id
    assert message.headers["tenant"] == "acme"
    assert message.properties["priority"] == 3
    args, kwargs, embed = message.decode()
    assert (args, kwargs) == ([1, 2], {})
    assert embed["callbacks"][0]["task"] == "testproject.demo.tasks.noop"
    assert (copy.status, copy.queue, copy.priority) == (states.PENDING, HELD, 3)


def test_rows_that_cannot_be_replayed_are_refused_with_the_reason(admin_client):
    secret = make_row(
        task="testproject.demo.tasks.charge_card",
        status=states.FAILURE,
        args=None,
        kwargs=None,
        replayable=False,
        argsrepr="<2 hidden>",
    )
    nameless = make_row(task="", status=states.FAILURE)
    good = make_row(status=states.FAILURE, queue=HELD)
    page = act(admin_client, "retry_tasks", [secret, nameless, good], confirm=False)
    content = page.content.decode()
    assert "refused: it is a secret task: its arguments are not stored" in content
    assert "refused: its task name is unknown" in content
    response = act(admin_client, "retry_tasks", [secret, nameless, good])
    messages = texts(response)
    assert any(secret.task_id in m and "not retried: it is a secret task" in m for m in messages)
    assert any(nameless.task_id in m and "task name is unknown" in m for m in messages)
    assert "Retried 1 of 3 selected tasks." in messages
    assert not TaskResultMeta.objects.filter(retried_from__in=[secret.task_id, nameless.task_id])
    assert TaskResultMeta.objects.filter(retried_from=good.task_id).count() == 1


def test_retry_across_a_filtered_selection(admin_client, celery_app):
    rows = [make_row(status=states.FAILURE, task="bulk.retry.me", queue=HELD) for _ in range(5)]
    make_row(status=states.SUCCESS, task="bulk.retry.me", queue=HELD)
    url = changelist(status="FAILURE", task="bulk.retry.me")
    page = act(
        admin_client, "retry_tasks", rows[:1], confirm=False, url=url, select_across="1", index="0"
    )
    content = page.content.decode()
    assert 'value="Yes, retry 5 tasks"' in content and 'name="select_across" value="1"' in content
    act(admin_client, "retry_tasks", rows[:1], url=url, select_across="1")
    copies = TaskResultMeta.objects.filter(retried_from__isnull=False)
    assert sorted(copies.values_list("retried_from", flat=True)) == sorted(r.task_id for r in rows)
    assert len(held_messages(celery_app)) == 5


# -- scheduled tasks: cancel, send now; revoke -------------------------------------


def test_cancel_scheduled_tasks(admin_client, patched, celery_app):
    waiting = tasks.add.apply_async((1, 1), countdown=3600, queue=HELD)
    held = tasks.add.apply_async((2, 2), countdown=3600, queue=HELD)
    TaskResultMeta.objects.filter(task_id=held.id).update(scheduled_id=uuid.uuid4())
    done = make_row()
    selected = [row(waiting.id), row(held.id), done]
    content = act(admin_client, "cancel_scheduled_tasks", selected, confirm=False).content.decode()
    assert "will be cancelled" in content and "a sender is forwarding it right now" in content
    messages = texts(act(admin_client, "cancel_scheduled_tasks", selected))
    assert any(waiting.id in m and m.endswith("cancelled") for m in messages)
    assert any(done.task_id in m and "not scheduled (state SUCCESS)" in m for m in messages)
    assert row(waiting.id).status == states.REVOKED
    assert row(held.id).status == SCHEDULED
    assert scheduler.forward_due(celery_app).sent == 0
    assert held_messages(celery_app) == []


@pytest.mark.usefixtures("worker")
def test_send_scheduled_now_runs_the_task_once(admin_client, patched, celery_app):
    result = tasks.record_run.apply_async(("now",), countdown=3600)
    assert row(result.id).status == SCHEDULED
    messages = texts(act(admin_client, "send_scheduled_now", [row(result.id)]))
    assert any(result.id in m and "sent now" in m for m in messages)
    assert result.get(timeout=20) == "now"
    # A second send-now and a sender pass find nothing to send: it ran once.
    messages = texts(act(admin_client, "send_scheduled_now", [row(result.id)]))
    assert any("not scheduled (state SUCCESS)" in m for m in messages)
    TaskResultMeta.objects.filter(task_id=result.id).update(eta=timezone.now())
    assert scheduler.forward_due(celery_app).sent == 0
    assert Run.objects.filter(task_id=result.id).count() == 1


def test_send_now_never_takes_a_row_a_sender_holds(admin_client, patched, celery_app):
    result = tasks.add.apply_async((1, 1), countdown=3600, queue=HELD)
    TaskResultMeta.objects.filter(task_id=result.id).update(scheduled_id=uuid.uuid4())
    messages = texts(act(admin_client, "send_scheduled_now", [row(result.id)]))
    assert any("a sender is forwarding it right now" in m for m in messages)
    # Even when the page was built before the sender took it.
    free = tasks.add.apply_async((2, 2), countdown=3600, queue=HELD)
    assert scheduler.send_now(celery_app, [free.id]) == {free.id: "sent"}
    assert scheduler.send_now(celery_app, [free.id]) == {free.id: "not claimed"}
    assert [m.headers["id"] for m in held_messages(celery_app)] == [free.id]
    assert row(free.id).status == SCHEDULED_SENT


@pytest.mark.usefixtures("worker")
def test_revoke_pending_and_scheduled_tasks(admin_client, settings, celery_app):
    # Held by the worker until its eta (a broker ETA): the revoke reaches it first.
    pending = tasks.record_run.apply_async(("never",), countdown=4)
    done = make_row()
    settings.DJANGO_CELERY_FULLDBRESULT_SCHEDULE_ETA = True
    scheduled = tasks.scheduled_add.apply_async((1, 2), countdown=3600)
    selected = [row(pending.id), row(scheduled.id), done]
    content = act(admin_client, "revoke_tasks", selected, confirm=False).content.decode()
    assert 'name="terminate"' in content and "already finished (SUCCESS)" in content
    messages = texts(act(admin_client, "revoke_tasks", selected))
    assert any(pending.id in m and "revoke sent to the workers" in m for m in messages)
    assert any(scheduled.id in m and "cancelled before it was sent" in m for m in messages)
    assert row(scheduled.id).status == states.REVOKED
    wait_for(lambda: row(pending.id).status == states.REVOKED, timeout=30)
    assert not Run.objects.filter(task_id=pending.id).exists()


# -- django-celery-beat -------------------------------------------------------------


@pytest.fixture
def periodic(db):
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    # django-celery-beat records each change with update_or_create (a read, then a write):
    # on SQLite, taking the write lock first keeps a worker's commit from refusing it.
    with writing_first("default"):
        every = IntervalSchedule.objects.create(every=1, period="days")

    def create(**values):
        defaults = {"interval": every, "task": "testproject.demo.tasks.echo", "enabled": False}
        with writing_first("default"):
            return PeriodicTask.objects.create(**{**defaults, **values})

    return create


@needs_beat
def test_beat_admin_is_overridden_and_links_to_results(admin_client, periodic):
    from django.contrib import admin
    from django_celery_beat.models import PeriodicTask

    from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin

    assert isinstance(admin.site._registry[PeriodicTask], CustomPeriodicTaskAdmin)
    periodic(name="nightly & <report>")
    url = reverse("admin:django_celery_beat_periodictask_changelist")
    content = admin_client.get(url).content.decode()
    assert 'value="run_now"' in content and 'value="run_tasks"' not in content
    assert "?periodic_task_name=nightly+%26+%3Creport%3E" in content


@needs_beat
def test_beat_run_now_honours_the_routing_and_headers(admin_client, periodic, celery_app):
    task = periodic(
        name="report <b>",
        args='[1, "two"]',
        kwargs='{"k": 3}',
        queue=HELD,
        exchange=HELD,
        routing_key=HELD,
        priority=7,
        headers='{"tenant": "acme"}',
        expire_seconds=600,
    )
    url = reverse("admin:django_celery_beat_periodictask_changelist")
    page = admin_client.post(url, {"action": "run_now", "_selected_action": [task.pk]})
    assert 'value="Yes, run 1 task now"' in page.content.decode()
    assert held_messages(celery_app) == []
    response = admin_client.post(
        url, {"action": "run_now", "_selected_action": [task.pk], "post": "yes"}, follow=True
    )
    assert any("report &lt;b&gt;: sent as" in m for m in texts(response))
    (message,) = held_messages(celery_app)
    headers = message.headers
    assert headers["periodic_task_name"] == "report <b>" and headers["tenant"] == "acme"
    assert headers["expires"] is not None
    assert message.properties["priority"] == 7
    assert message.delivery_info["routing_key"] == HELD
    assert list(message.decode()[:2]) == [[1, "two"], {"k": 3}]
    stored = row(headers["id"])  # the publish record
    assert (stored.periodic_task_name, stored.queue, stored.priority) == ("report <b>", HELD, 7)
    assert stored.expires is not None


@needs_beat
@pytest.mark.usefixtures("worker")
def test_beat_run_now_reaches_the_worker(admin_client, periodic, celery_app):
    task = periodic(name="echo now", kwargs='{"x": 1}', headers='{"tenant": "acme"}')
    url = reverse("admin:django_celery_beat_periodictask_changelist")
    admin_client.post(url, {"action": "run_now", "_selected_action": [task.pk], "post": "yes"})
    done = TaskResultMeta.objects.filter(periodic_task_name="echo now")
    wait_for(lambda: done.filter(status=states.SUCCESS).exists())
    assert done.get().get_result() == {"args": [], "kwargs": {"x": 1}}
    listed = admin_client.get(changelist(periodic_task_name="echo+now")).context["cl"].result_list
    assert [r.task_id for r in listed] == [done.get().task_id]


def test_custom_admin_site(admin_client, settings):
    settings.ROOT_URLCONF = "tests.custom_admin_urls"
    target = make_row(periodic_task_name="nightly")
    url = reverse("custom:django_celery_fulldbresult_taskresultmeta_changelist")
    assert url.startswith("/custom-admin/")
    assert target.task_id in admin_client.get(url).content.decode()
    assert admin_client.get(url + "dashboard/").status_code in (200, 404)


@needs_beat
def test_custom_admin_site_links_beat_to_results(admin_client, settings, periodic):
    settings.ROOT_URLCONF = "tests.custom_admin_urls"
    periodic(name="nightly")
    url = reverse("custom:django_celery_fulldbresult_taskresultmeta_changelist")
    beat = admin_client.get(reverse("custom:django_celery_beat_periodictask_changelist"))
    assert f'href="{url}?periodic_task_name=nightly"' in beat.content.decode()


def test_the_0_5_setting_name_is_accepted(settings):
    from django_celery_fulldbresult import conf

    settings.DJANGO_CELERY_FULLDBRESULT_OVERRIDE_BEAT_ADMIN = None
    settings.DJANGO_CELERY_FULLDBRESULT_OVERRIDE_DJCELERY_ADMIN = True
    assert conf.get("OVERRIDE_BEAT_ADMIN") is True


def test_packed_arguments_that_cannot_be_decoded_are_refused(admin_client):
    packed = make_row(
        status=states.FAILURE,
        args=None,
        kwargs=None,
        packed_args=b"\x80\x04not really pickle",
        packed_args_content_type="application/x-python-serialize",
    )
    broken = make_row(
        status=states.FAILURE,
        args=None,
        kwargs=None,
        packed_args=b"[[1, 2], {not json",
        packed_args_content_type="application/json",
    )
    content = act(admin_client, "retry_tasks", [packed, broken], confirm=False).content.decode()
    # Pickle is never decoded in the web tier (tests/test_admin_decoding.py), even when the
    # app accepts it; JSON that does not decode is refused with the decoder's reason.
    assert "which is not decoded here" in content
    assert "refused: its stored arguments cannot be decoded" in content
    detail_page = admin_client.get(detail(packed)).content.decode()
    assert "stored as application/x-python-serialize (" in detail_page
    assert "not decoded here" in detail_page
    detail_page = admin_client.get(detail(broken)).content.decode()
    assert "packed (application/json), not shown" in detail_page


def test_too_large_a_selection_is_refused_before_anything_happens(admin_client, monkeypatch):
    from django_celery_fulldbresult.admin import actions

    monkeypatch.setattr(actions, "ACTION_LIMIT", 2)
    rows = [make_row(status=states.FAILURE, queue=HELD) for _ in range(3)]
    response = act(admin_client, "retry_tasks", rows)
    assert "Select at most 2 tasks for this action." in texts(response)
    assert not TaskResultMeta.objects.filter(retried_from__isnull=False).exists()
