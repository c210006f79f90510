"""The admin in a real browser: headless Chromium, a live server and a real worker.

An operator logs in, filters by state, opens a failed task, retries it, confirms, and
sees the copy succeed through the worker; a staff user without the retry permission
is offered no Retry action and cannot post it either; hostile HTML in a task's
arguments, result or traceback is shown as text and never runs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from celery import states
from django.contrib.auth.models import Permission

from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .conftest import wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("worker"),
]

CHANGELIST = "/admin/django_celery_fulldbresult/taskresultmeta/"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def page(browser, live_server) -> Iterator[object]:
    """A fresh browser context (no cookies) on the live server."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(20_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


@pytest.fixture
def staff_without_retry(django_user_model):
    """May view task states and revoke tasks, but not retry them."""
    user = django_user_model.objects.create_user("clerk", password=PASSWORD, is_staff=True)
    codenames = ["view_taskresultmeta", "revoke_taskresultmeta"]
    perms = Permission.objects.filter(
        content_type__app_label="django_celery_fulldbresult", codename__in=codenames
    )
    assert sorted(p.codename for p in perms) == sorted(codenames)
    user.user_permissions.set(perms)
    return user


def finished(result) -> TaskResultMeta:
    """Wait until the worker has stored a final state for ``result``.

    A bound, not a timing: the first task of a run also waits for a cold worker.
    """
    return wait_for(
        lambda: TaskResultMeta.objects.filter(
            task_id=result.id, status__in=states.READY_STATES
        ).first(),
        timeout=60,
    )


def submit(page, button) -> None:
    """Click a button that posts its form, and wait for the page the post returns.

    The admin's actions post to the changelist's own URL, so waiting for a URL returns at
    once and a count() taken then would read the old page.
    """
    with page.expect_navigation():
        button.click()


def log_in(page, username: str) -> None:
    page.goto(f"/admin/login/?next={CHANGELIST}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.locator("#login-form [type=submit]").click()
    page.wait_for_url(f"**{CHANGELIST}")


def result_row(page, task_id: str):
    return page.locator("#result_list tbody tr", has_text=task_id)


def action_choices(page) -> list[str]:
    return page.locator("select[name=action] option").evaluate_all(
        "options => options.map(o => o.value)"
    )


def test_operator_retries_a_failed_task_and_sees_the_copy_succeed(page, superuser, tmp_path):
    missing = tmp_path / "report.csv"
    # An id starting with a letter, as 6 in 16 are: the page must show it unchanged.
    failed_id = "f" + str(uuid.uuid4())[1:]
    failed = finished(tasks.read_file.apply_async((str(missing),), task_id=failed_id))
    succeeded = finished(tasks.add.delay(2, 3))
    assert (failed.status, succeeded.status) == (states.FAILURE, states.SUCCESS)
    missing.write_text("fixed")  # the cause is gone: a retry now succeeds

    log_in(page, "root")
    assert result_row(page, succeeded.task_id).count() == 1

    # Filter by state.
    page.locator("#changelist-filter a", has_text=re.compile(r"^\s*failure\s*$", re.I)).click()
    page.wait_for_url(re.compile(r"\?.*FAILURE"))
    assert result_row(page, failed.task_id).count() == 1
    assert result_row(page, succeeded.task_id).count() == 0
    filtered = page.url

    # Open the row: the read-only detail page shows the task and its traceback.
    page.locator("#result_list a", has_text=failed.task_id).click()
    page.wait_for_url(re.compile(rf"{CHANGELIST}{failed.pk}/"))
    detail = page.locator("#content").inner_text()
    assert tasks.read_file.name in detail
    assert "FileNotFoundError" in detail
    assert str(missing) in detail
    assert page.locator("input[name=_save]").count() == 0  # nothing to edit

    # Select the row, choose Retry: a confirmation page, nothing sent yet.
    page.goto(filtered)
    result_row(page, failed.task_id).locator("input.action-select").check()
    page.select_option("select[name=action]", "retry_tasks")
    submit(page, page.locator("button[name=index]"))
    confirm = page.get_by_role("button", name=re.compile(r"^Yes,"))
    assert confirm.count() == 1
    assert page.locator("input[type=hidden][name=post][value=yes]").count() == 1
    assert failed.task_id in page.locator("#content").text_content()
    assert TaskResultMeta.objects.filter(task=tasks.read_file.name).count() == 1

    # Confirm: back on the changelist with a message about this row.
    submit(page, confirm)
    messages = page.locator("ul.messagelist").text_content()
    assert failed.task_id in messages

    # The copy runs on the worker and succeeds; the original row is left as it was.
    copy = wait_for(
        lambda: TaskResultMeta.objects.filter(
            retried_from=failed.task_id, status=states.SUCCESS
        ).first(),
        timeout=60,
    )
    assert copy.task_id in messages
    assert (copy.task, copy.get_call()) == (failed.task, failed.get_call())
    assert copy.get_result() == "fixed"
    failed.refresh_from_db()
    assert failed.status == states.FAILURE
    assert TaskResultMeta.objects.filter(task=tasks.read_file.name).count() == 2

    # Reloaded, the changelist shows the copy's success.
    page.goto(CHANGELIST)
    page.fill("#searchbar", copy.task_id)
    page.press("#searchbar", "Enter")
    page.wait_for_url(re.compile(r"\?q="))
    row = result_row(page, copy.task_id)
    assert row.count() == 1
    assert "SUCCESS" in row.inner_text().upper()

    # The original's detail page links to its copy, and the copy's back to it.
    page.goto(f"{CHANGELIST}{failed.pk}/change/")
    page.locator(".field-lineage a", has_text=copy.task_id).click()
    page.wait_for_url(re.compile(rf"{CHANGELIST}{copy.pk}/"))
    assert failed.task_id in page.locator(".field-lineage").text_content()


def test_staff_without_the_permission_is_not_offered_retry_and_cannot_post_it(
    page, staff_without_retry
):
    failed = finished(tasks.fail.delay("card declined"))
    assert failed.status == states.FAILURE

    log_in(page, "clerk")
    choices = action_choices(page)
    assert "revoke_tasks" in choices  # the actions this user may run are offered
    assert "retry_tasks" not in choices

    # Post the action anyway, as if the confirmation had been answered (a forged form).
    page.evaluate(
        """() => {
            const form = document.getElementById("changelist-form");
            const select = form.querySelector("select[name=action]");
            select.add(new Option("Retry", "retry_tasks"));
            select.value = "retry_tasks";
            const post = document.createElement("input");
            Object.assign(post, {type: "hidden", name: "post", value: "yes"});
            form.appendChild(post);
        }"""
    )
    result_row(page, failed.task_id).locator("input.action-select").check()
    submit(page, page.locator("button[name=index]"))
    assert "No action selected" in page.locator("ul.messagelist").text_content()
    assert page.get_by_role("button", name=re.compile(r"^Yes,")).count() == 0
    assert TaskResultMeta.objects.filter(task=tasks.fail.name).count() == 1


HOSTILE = '<script>window.pwned = "script"</script><img src=x onerror="window.pwned = \'img\'">'
#: Elements of the page that came from HOSTILE (the admin's own scripts do not mention it).
INJECTED_ELEMENTS = """() => [...document.querySelectorAll("script, img")]
    .filter(element => element.outerHTML.includes("pwned")).length"""


def test_hostile_arguments_results_and_tracebacks_are_shown_as_text(page, superuser):
    echoed = finished(tasks.echo.delay(HOSTILE, note=HOSTILE))
    failed = finished(tasks.fail.delay(HOSTILE))
    assert (echoed.status, failed.status) == (states.SUCCESS, states.FAILURE)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    log_in(page, "root")
    for row in (echoed, failed):
        page.goto(f"{CHANGELIST}{row.pk}/change/")
        page.wait_for_load_state("load")  # an injected <img> would have fired onerror by now
        text = page.locator("#content").inner_text()
        assert "<script>" in text  # shown as text, in the arguments or the traceback
        assert page.evaluate(INJECTED_ELEMENTS) == 0
        assert page.evaluate("window.pwned") is None
    assert dialogs == []
