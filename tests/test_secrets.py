"""Secret tasks keep no arguments anywhere (issue 13): their own row, the rows of tasks
whose link, chain or chord holds them, chord and group tables, the admin, the package's
logs, the management commands' output, and the messages themselves."""

from __future__ import annotations

import io
import logging
import uuid

import pytest
from celery import chain, chord, group, signals
from django.apps import apps
from django.core.management import call_command
from django.db import connections

from django_celery_fulldbresult import db, publish, secrecy
from django_celery_fulldbresult.models import TaskResultMeta
from testproject.demo import tasks

from .conftest import take_messages, wait_for
from .test_publish_tracking import NOBODY

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]


def _secret(label: str) -> str:
    """A value that appears nowhere unless a secret leaked (4111 marks card numbers)."""
    return f"4111-{label}-{uuid.uuid4().hex[:12]}"


def _every_stored_value() -> list[tuple[str, str, str]]:
    """(table, column, text) for every column of every row of the package's tables, read
    with SQL (bytes as text too, so packed payloads count)."""
    found = []
    connection = connections[db.task_db_alias()]
    for model in apps.get_app_config("django_celery_fulldbresult").get_models():
        table = model._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")  # noqa: S608
            names = [column[0] for column in cursor.description]
            for row in cursor.fetchall():
                for name, value in zip(names, row, strict=True):
                    if isinstance(value, memoryview):
                        value = value.tobytes()
                    if isinstance(value, bytes):
                        value = value.decode("latin-1")
                    found.append((table, name, "" if value is None else str(value)))
    return found


def _leaks(secrets: list[str], texts: list[tuple[str, str, str]]) -> list:
    # Also the card number's digits alone: a repr may split or quote it differently.
    needles = secrets + [secret.split("-")[-1] for secret in secrets]
    return [(table, column) for table, column, text in texts for n in needles if n in text]


@pytest.fixture
def package_log(caplog):
    caplog.set_level(logging.DEBUG, logger="django_celery_fulldbresult")
    return caplog


def test_a_canvas_with_secret_members_leaves_their_arguments_nowhere(
    settings, celery_app, admin_client, package_log
):
    settings.DJANGO_CELERY_FULLDBRESULT_SECRET_RESULTS = False
    cards = [_secret(label) for label in ("chain", "chord", "link", "error", "call", "group")]
    # A chain: the row of add held the card number in its options before.
    in_chain = chain(tasks.add.s(1, 2), tasks.charge_card.si(cards[0], 10)).apply_async()
    # A chord whose header and body hold secret members.
    in_chord = chord(
        [tasks.charge_card.si(cards[1], 1), tasks.add.si(2, 2)], tasks.charge_card.s(7)
    ).apply_async()
    # link and link_error callbacks that are secret.
    linked = tasks.add.apply_async((3, 4), link=tasks.charge_card.si(cards[2], 5))
    errback = tasks.fail.apply_async(("boom",), link_error=tasks.charge_card.si(cards[3], 6))
    # A call made secret by its caller, whose task is not secret (its result is hidden too).
    per_call = tasks.add.apply_async((cards[4], "!"), headers=secrecy.secret_headers())
    # A group of secret members.
    members = group(tasks.charge_card.si(cards[5], i) for i in range(3)).apply_async()

    # SECRET_RESULTS = False: a secret task's result is not stored.
    assert in_chain.get(timeout=30) is None
    assert in_chain.parent.get(timeout=30) == 3
    assert in_chord.get(timeout=30) is None
    assert linked.get(timeout=30) == 7
    with pytest.raises(Exception, match="boom"):
        errback.get(timeout=30)
    assert per_call.get(timeout=30) is None
    assert members.get(timeout=30) == [None, None, None]
    # 7 rows: the errback runs inside the failing task (Celery calls an errback that takes
    # two or more arguments in place).
    wait_for(lambda: TaskResultMeta.objects.filter(task=tasks.charge_card.name).count() >= 7)
    wait_for(
        lambda: (
            not TaskResultMeta.objects.filter(
                task=tasks.charge_card.name, status__in=["PENDING", "STARTED"]
            ).exists()
        )
    )
    publish.flush()

    texts = _every_stored_value()
    assert texts, "no rows were read"
    assert _leaks(cards, texts) == []

    # The rows that held secret signatures say they cannot be sent again, and why.
    add_row = TaskResultMeta.objects.get(task_id=in_chain.parent.id)
    assert not add_row.replayable
    assert secrecy.refusal(add_row) == secrecy.REFUSALS["secret-callback"]
    assert secrecy.holds_hidden(add_row.options)
    secret_row = TaskResultMeta.objects.get(task_id=per_call.id)
    assert (secret_row.args, secret_row.kwargs, secret_row.replayable) == (None, None, False)
    assert secrecy.refusal(secret_row) == secrecy.REFUSALS["secret"]

    # Nor in the admin (the list and every row's page), the package's logs, or the commands.
    pages = [admin_client.get("/admin/django_celery_fulldbresult/taskresultmeta/").content]
    for pk in TaskResultMeta.objects.values_list("pk", flat=True):
        page = admin_client.get(f"/admin/django_celery_fulldbresult/taskresultmeta/{pk}/change/")
        assert page.status_code == 200
        pages.append(page.content)
    html = b"".join(pages).decode()
    assert _leaks(cards, [("admin", "html", html)]) == []
    assert secrecy.REFUSALS["secret-callback"] in html
    output = io.StringIO()
    call_command("find_stale_tasks", stdout=output)
    call_command("task_stats", stdout=output)
    assert _leaks(cards, [("commands", "output", output.getvalue())]) == []
    assert _leaks(cards, [("log", "text", package_log.text)]) == []


def test_a_secret_call_of_a_task_that_is_not_secret_hides_its_reprs(celery_app):
    card = _secret("repr")
    result = tasks.add.apply_async((card, "x"), headers=secrecy.secret_headers(), queue=NOBODY)
    publish.flush()
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert (row.args, row.argsrepr, row.replayable) == (None, "<2 hidden>", False)
    (headers,) = [
        m.headers for m in take_messages(celery_app, NOBODY) if m.headers["id"] == result.id
    ]
    assert headers["argsrepr"] == "<2 hidden>"
    assert card not in repr(headers)


def test_the_worker_never_keeps_a_default_repr_of_a_secret_task(celery_app):
    """A tuple inside the arguments becomes a list in the message, so the worker cannot tell
    Celery's default repr from a chosen one: it stored ``(('4111', '1111'), 10)`` before."""
    card = (_secret("a"), _secret("b"))
    # A publisher without this package's hook (another service, or TRACK_PUBLISH off and
    # the hook missing): the message carries Celery's own repr of the arguments.
    signals.before_task_publish.disconnect(dispatch_uid="fulldbresult.before_publish")
    try:
        result = tasks.charge_card.delay(card, 10)
    finally:
        signals.before_task_publish.connect(
            publish.on_before_publish, dispatch_uid="fulldbresult.before_publish"
        )
    assert result.get(timeout=20) == "charged 10"
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.argsrepr == "<2 hidden>" and row.kwargsrepr == "<0 hidden>"
    assert _leaks(list(card), [("row", "argsrepr", row.argsrepr or "")]) == []


def test_the_publisher_hides_the_reprs_in_the_message_itself(celery_app):
    card = (_secret("tuple"), "1111")
    hidden = tasks.charge_card.apply_async((card, 10), queue=NOBODY)
    chosen = tasks.charge_card.apply_async((card, 3), argsrepr="('****', 3)", queue=NOBODY)
    publish.flush()
    messages = {m.headers["id"]: m.headers for m in take_messages(celery_app, NOBODY)}
    assert messages[hidden.id]["argsrepr"] == "<2 hidden>"
    assert messages[chosen.id]["argsrepr"] == "('****', 3)"
    assert {messages[r.id][secrecy.SECRET_HEADER] for r in (hidden, chosen)} == {secrecy.CHECKED}
    # The worker keeps what the publisher checked: the chosen repr survives.
    assert TaskResultMeta.objects.get(task_id=chosen.id).argsrepr == "('****', 3)"
    assert TaskResultMeta.objects.get(task_id=hidden.id).argsrepr == "<2 hidden>"


def test_secret_results_can_be_kept_out(settings):
    settings.DJANGO_CELERY_FULLDBRESULT_SECRET_RESULTS = False
    card = _secret("result")
    ok = tasks.charge_card.delay(card, 10)
    assert ok.get(timeout=20) is None
    failed = tasks.fail.apply_async((f"card {card} refused",), headers=secrecy.secret_headers())
    with pytest.raises(Exception) as raised:
        failed.get(timeout=20)
    assert card not in str(raised.value) and secrecy.HIDDEN_MESSAGE in str(raised.value)
    row = TaskResultMeta.objects.get(task_id=failed.id)
    assert row.status == "FAILURE" and row.traceback is None
    assert _leaks([card], [("row", "result", row.result or "")]) == []

    # By default the result is kept: AsyncResult.get() needs it.
    settings.DJANGO_CELERY_FULLDBRESULT_SECRET_RESULTS = True
    kept = tasks.charge_card.delay(card, 11)
    assert kept.get(timeout=20) == "charged 11"


def test_a_delayed_call_with_a_secret_callback_keeps_its_eta_in_the_broker(patched, celery_app):
    card = _secret("eta")
    result = tasks.add.apply_async((1, 1), countdown=1, link=tasks.charge_card.si(card, 1))
    assert result.get(timeout=30) == 2
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.status == "SUCCESS" and not row.replayable
    assert _leaks([card], _every_stored_value()) == []


def test_a_secret_call_stays_secret_through_its_retries():
    # Celery sends a retry as a new message built from the request: the header goes with it.
    result = tasks.flaky.apply_async((2,), headers=secrecy.secret_headers())
    assert result.get(timeout=30) is not None
    row = TaskResultMeta.objects.get(task_id=result.id)
    assert row.retries >= 1
    assert (row.args, row.kwargs, row.packed_args, row.replayable) == (None, None, None, False)
    assert row.argsrepr == "<1 hidden>"
