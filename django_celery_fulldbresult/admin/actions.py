"""Admin actions on task rows: retry, cancel, send now, revoke.

Each needs its own permission (``<name>_taskresultmeta``), shows a confirmation
page listing what will happen to each selected row (Django's delete-confirmation
convention: the form re-posts the selection with ``post=yes``), then reports
per row what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext_lazy

from .. import audit, replay, scheduler, serialization
from ..states import FINAL_STATES, SCHEDULED

#: Rows one action may handle; a larger selection is refused before anything is read.
ACTION_LIMIT = 10_000
#: Rows listed one by one on the confirmation page and in the report.
LISTED = 100

STATE_COLUMNS = (
    "id",
    "task_id",
    "task",
    "status",
    "scheduled_id",
    "eta",
    "expires",
    "packed_args_content_type",
)


@dataclass
class Line:
    """One row of a confirmation page or of a report."""

    task_id: str
    task: str
    status: str
    text: str
    ok: bool = True
    link_id: str | None = None  # another task row to link to (the copy of a retry)


def confirmed(request) -> bool:
    return request.POST.get("post") == "yes"


def _require(modeladmin, request, permission: str) -> None:
    # get_actions() already hides the action; this also refuses a hand-made POST.
    if not getattr(modeladmin, f"has_{permission}_permission")(request):
        raise PermissionDenied


def load(modeladmin, request, queryset, columns: Sequence[str]) -> list[Any] | None:
    """The selected rows (only ``columns``), or None when the selection is too large."""
    rows = list(queryset.order_by("-id").only(*columns)[: ACTION_LIMIT + 1])
    if len(rows) > ACTION_LIMIT:
        modeladmin.message_user(
            request,
            _("Select at most %(limit)d tasks for this action.") % {"limit": ACTION_LIMIT},
            messages.ERROR,
        )
        return None
    return rows


def confirmation(
    modeladmin,
    request,
    *,
    action: str,
    title: str,
    button: str,
    lines: list[Line],
    extra: str = "",
) -> TemplateResponse:
    """The page that asks first; its form re-posts the selection as it came."""
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "opts": opts,
        "app_label": opts.app_label,
        "action": action,
        "button": button,
        "lines": lines[:LISTED],
        "more": max(0, len(lines) - LISTED),
        "accepted": sum(1 for line in lines if line.ok),
        "refused": sum(1 for line in lines if not line.ok),
        "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
        "select_across": request.POST.get("select_across") == "1",
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "extra": extra,
        "media": modeladmin.media,
    }
    return TemplateResponse(
        request,
        [
            f"admin/{opts.app_label}/{opts.model_name}/action_confirmation.html",
            f"admin/{opts.app_label}/action_confirmation.html",
            "admin/django_celery_fulldbresult/action_confirmation.html",
        ],
        context,
    )


def report(modeladmin, request, summary: str, lines: list[Line]) -> None:
    """One message per row (the first ``LISTED``), then a summary."""
    for line in lines[:LISTED]:
        level = messages.SUCCESS if line.ok else messages.WARNING
        # Ids in <code>: the admin template capitalises a message's first letter, which
        # would show "f25..." as "F25...", an id that does not exist.
        if line.link_id:
            url = modeladmin.changelist_url(q=line.link_id)
            text = format_html(
                '<code>{}</code> ({}): {} <a href="{}"><code>{}</code></a>',
                line.task_id,
                line.task,
                line.text,
                url,
                line.link_id,
            )
        else:
            text = format_html("<code>{}</code> ({}): {}", line.task_id, line.task, line.text)
        modeladmin.message_user(request, text, level)
    if len(lines) > LISTED:
        summary += " " + _("(%(count)d more not listed)") % {"count": len(lines) - LISTED}
    modeladmin.message_user(request, summary, messages.INFO)


def _run(
    modeladmin,
    request,
    queryset,
    *,
    action: str,
    permission: str,
    columns: Sequence[str],
    plan: Callable[[Any], tuple[bool, str]],
    execute: Callable[[list[Any]], list[Line]],
    title: str,
    button: Any,
    done: str,
    extra: str = "",
):
    _require(modeladmin, request, permission)
    rows = load(modeladmin, request, queryset, columns)
    if rows is None:
        return None
    if not confirmed(request):
        lines = []
        for row in rows:
            ok, text = plan(row)
            lines.append(Line(row.task_id, row.task, row.status, text, ok))
        return confirmation(
            modeladmin,
            request,
            action=action,
            title=title,
            button=button % {"count": len(rows)},
            lines=lines,
            extra=extra,
        )
    lines = execute(rows)
    _audit(request, modeladmin.model, action, rows, lines)
    accepted = sum(1 for line in lines if line.ok)
    report(modeladmin, request, done % {"done": accepted, "count": len(lines)}, lines)
    return None


#: How each action names itself in the admin's history (``audit``).
AUDIT_NAMES = {
    "retry_tasks": "Retry",
    "cancel_scheduled_tasks": "Cancel",
    "send_scheduled_now": "Send now",
    "revoke_tasks": "Revoke",
}


def _audit(request, model: type, action: str, rows: list[Any], lines: list[Line]) -> None:
    """One history entry per row the action handled: what happened, and the copy's id."""
    pks = {row.task_id: row.pk for row in rows}
    audit.record(
        request,
        model,
        AUDIT_NAMES[action],
        (
            audit.Entry(
                pks[line.task_id],
                str(model(task_id=line.task_id, status=line.status)),
                f"{line.text} {line.link_id}" if line.link_id else line.text,
            )
            for line in lines
            if line.task_id in pks
        ),
    )


# -- retry --------------------------------------------------------------------------


@admin.action(description=gettext_lazy("Retry selected tasks (send a copy)"), permissions=["retry"])
def retry_tasks(modeladmin, request, queryset):
    app = modeladmin.get_celery_app()
    # The web tier never unpickles: a copy whose call only the app may decode is sent by
    # the scheduler's sender (or refused without the scheduler).
    accept = serialization.safe_accept(app.conf.accept_content)

    def plan(row) -> tuple[bool, str]:
        reason = replay.refusal(row, accept, defer=True)
        if reason:
            return False, _("refused: %(reason)s") % {"reason": reason}
        if not replay.decodable(row, accept):
            return True, _("a copy will wait for the scheduler's sender, which sends it now")
        return True, _("a copy will be sent with a new id, the same arguments and routing")

    def execute(rows: list[Any]) -> list[Line]:
        status = {row.task_id: row.status for row in rows}
        lines = []
        for outcome in replay.retry(app, rows, accept):
            if outcome.sent and outcome.deferred:
                text, ok = _("retried (sent by the scheduler's sender) as"), True
            elif outcome.sent:
                text, ok = _("retried as"), True
            else:
                text, ok = _("not retried: %(reason)s") % {"reason": outcome.error}, False
            lines.append(
                Line(
                    outcome.task_id, outcome.task, status[outcome.task_id], text, ok, outcome.new_id
                )
            )
        return lines

    return _run(
        modeladmin,
        request,
        queryset,
        action="retry_tasks",
        permission="retry",
        columns=replay.COLUMNS,
        plan=plan,
        execute=execute,
        title=_("Retry tasks"),
        button=ngettext_lazy("Yes, retry %(count)d task", "Yes, retry %(count)d tasks", "count"),
        done=_("Retried %(done)d of %(count)d selected tasks."),
    )


# -- scheduled tasks: cancel, send now ----------------------------------------------


def _waiting(row) -> tuple[bool, str]:
    """Whether a row is a scheduled task no sender holds, and why not."""
    if row.status != SCHEDULED:
        return False, _("not scheduled (state %(state)s)") % {"state": row.status}
    if row.scheduled_id is not None:
        return False, _("a sender is forwarding it right now")
    return True, ""


@admin.action(description=gettext_lazy("Cancel selected scheduled tasks"), permissions=["cancel"])
def cancel_scheduled_tasks(modeladmin, request, queryset):
    app = modeladmin.get_celery_app()

    def plan(row) -> tuple[bool, str]:
        ok, reason = _waiting(row)
        return ok, (_("will be cancelled: REVOKED, never sent") if ok else reason)

    def execute(rows: list[Any]) -> list[Line]:
        lines = []
        for row in rows:
            ok, text = _waiting(row)
            if ok:
                ok = scheduler.cancel_scheduled(row.task_id, app)
                text = _("cancelled") if ok else _("not cancelled: it was sent meanwhile")
            lines.append(Line(row.task_id, row.task, row.status, text, ok))
        return lines

    return _run(
        modeladmin,
        request,
        queryset,
        action="cancel_scheduled_tasks",
        permission="cancel",
        columns=STATE_COLUMNS,
        plan=plan,
        execute=execute,
        title=_("Cancel scheduled tasks"),
        button=ngettext_lazy("Yes, cancel %(count)d task", "Yes, cancel %(count)d tasks", "count"),
        done=_("Cancelled %(done)d of %(count)d selected tasks."),
    )


SEND_NOW_TEXT = {
    "sent": gettext_lazy("sent now"),
    "failed": gettext_lazy("not sent: its stored call cannot be decoded (now FAILURE)"),
    "released": gettext_lazy("not sent: the broker failed; it stays scheduled"),
    "not claimed": gettext_lazy("not sent: it was sent, cancelled or expired meanwhile"),
    "due": gettext_lazy(
        "due now: the scheduler's sender sends it (its arguments are not decoded here)"
    ),
}


def _decodable_here(app: Any, row: Any) -> bool:
    return replay.decodable(row, serialization.safe_accept(app.conf.accept_content))


@admin.action(
    description=gettext_lazy("Send selected scheduled tasks now"), permissions=["send_now"]
)
def send_scheduled_now(modeladmin, request, queryset):
    app = modeladmin.get_celery_app()

    def plan(row) -> tuple[bool, str]:
        ok, reason = _waiting(row)
        if ok and row.expires is not None and row.expires <= timezone.now():
            return False, _("expired: it will be revoked, not sent")
        if not ok:
            return False, reason
        return True, _("will be sent now instead of at %(eta)s") % {"eta": row.eta}

    def execute(rows: list[Any]) -> list[Line]:
        waiting = [row for row in rows if _waiting(row)[0]]
        # The web tier never unpickles: what it may not decode is made due for the sender.
        here = [row.task_id for row in waiting if _decodable_here(app, row)]
        elsewhere = [row.task_id for row in waiting if not _decodable_here(app, row)]
        outcomes = scheduler.send_now(app, here) if here else {}
        if elsewhere:
            due = scheduler.make_due(elsewhere)
            outcomes.update(
                {task_id: "due" if task_id in due else "not claimed" for task_id in elsewhere}
            )
        lines = []
        for row in rows:
            if row.task_id in outcomes:
                outcome = outcomes[row.task_id]
                ok, text = outcome in ("sent", "due"), str(SEND_NOW_TEXT[outcome])
            else:
                ok, text = _waiting(row)
            lines.append(Line(row.task_id, row.task, row.status, text, ok))
        return lines

    return _run(
        modeladmin,
        request,
        queryset,
        action="send_scheduled_now",
        permission="send_now",
        columns=STATE_COLUMNS,
        plan=plan,
        execute=execute,
        title=_("Send scheduled tasks now"),
        button=ngettext_lazy(
            "Yes, send %(count)d task now", "Yes, send %(count)d tasks now", "count"
        ),
        done=_("Sent %(done)d of %(count)d selected tasks."),
    )


# -- revoke -------------------------------------------------------------------------

TERMINATE_FIELD = "terminate"


@admin.action(description=gettext_lazy("Revoke selected tasks"), permissions=["revoke"])
def revoke_tasks(modeladmin, request, queryset):
    app = modeladmin.get_celery_app()
    terminate = request.POST.get(TERMINATE_FIELD) == "on"

    def plan(row) -> tuple[bool, str]:
        if row.status in FINAL_STATES:
            return False, _("already finished (%(state)s)") % {"state": row.status}
        if row.status == SCHEDULED:
            return True, _("will be cancelled before it is sent")
        return True, _("workers will be told to revoke it")

    def execute(rows: list[Any]) -> list[Line]:
        lines, broadcast = [], []
        for row in rows:
            ok, text = plan(row)
            if ok and row.status == SCHEDULED:
                if scheduler.cancel_scheduled(row.task_id, app):
                    text = _("cancelled before it was sent")
                else:  # a sender holds it or just sent it: revoke the message too
                    broadcast.append(row)
                    continue
            elif ok:
                broadcast.append(row)
                continue
            lines.append(Line(row.task_id, row.task, row.status, text, ok))
        if broadcast:
            lines += _broadcast_revoke(app, broadcast, terminate)
        return lines

    return _run(
        modeladmin,
        request,
        queryset,
        action="revoke_tasks",
        permission="revoke",
        columns=STATE_COLUMNS,
        plan=plan,
        execute=execute,
        title=_("Revoke tasks"),
        button=ngettext_lazy("Yes, revoke %(count)d task", "Yes, revoke %(count)d tasks", "count"),
        done=_("Revoked %(done)d of %(count)d selected tasks."),
        extra="terminate",
    )


def _broadcast_revoke(app: Any, rows: list[Any], terminate: bool) -> list[Line]:
    """One broadcast for every row: workers skip them, or kill them with ``terminate``."""
    try:
        app.control.revoke([row.task_id for row in rows], terminate=terminate)
    except Exception as exc:  # noqa: BLE001 - reported per row
        text = _("not revoked: the broker failed: %(error)s") % {"error": exc}
        return [Line(row.task_id, row.task, row.status, text, False) for row in rows]
    text = (
        _("revoke sent to the workers (terminate)")
        if terminate
        else _("revoke sent to the workers")
    )
    return [Line(row.task_id, row.task, row.status, text, True) for row in rows]


ACTIONS = (retry_tasks, cancel_scheduled_tasks, send_scheduled_now, revoke_tasks)
