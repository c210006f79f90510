"""django-celery-beat's PeriodicTask admin with "Run now" and links to the results.

django-celery-beat's own "Run selected tasks" sends only the name, arguments
and queue. "Run now" sends what beat itself would send: the arguments, queue,
exchange, routing key, priority, expiry and headers of the periodic task, with
the ``periodic_task_name`` header beat adds (so the result row records it).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext
from django_celery_beat.admin import PeriodicTaskAdmin
from django_celery_beat.models import PeriodicTask
from kombu.utils.json import loads

from ..models import TaskResultMeta
from .actions import Line, confirmation, confirmed

ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "priority")


def beat_call(task: PeriodicTask) -> tuple[list, dict, dict[str, Any]]:
    """(args, kwargs, options) as django-celery-beat's scheduler entry builds them.

    Raises ``ValueError`` for arguments or headers that are not valid JSON.
    """
    args = loads(task.args or "[]")
    kwargs = loads(task.kwargs or "{}")
    options: dict[str, Any] = {
        name: getattr(task, name)
        for name in ROUTING_OPTIONS
        if getattr(task, name) not in (None, "")
    }
    expires = task.expires_
    if expires:
        options["expires"] = expires
    headers = loads(task.headers or "{}")
    headers["periodic_task_name"] = task.name
    options["headers"] = headers
    return args, kwargs, options


def results_url(site_name: str, periodic_task_name: str) -> str | None:
    """The task changelist filtered on one periodic task, if the task admin is on this site."""
    opts = TaskResultMeta._meta
    try:
        url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist", current_app=site_name)
    except NoReverseMatch:
        return None
    return f"{url}?{urlencode({'periodic_task_name': periodic_task_name})}"


class CustomPeriodicTaskAdmin(PeriodicTaskAdmin):
    # Beat's own run_tasks is replaced by run_now (it ignores most routing options).
    actions = ("enable_tasks", "disable_tasks", "toggle_tasks", "run_now")
    list_display = (*PeriodicTaskAdmin.list_display, "recent_results")
    #: The Celery app that sends (None: django-celery-beat's, ``celery.current_app``).
    celery_app_override = None

    def get_celery_app(self) -> Any:
        if self.celery_app_override is not None:
            return self.celery_app_override
        return self.celery_app._get_current_object()

    @admin.display(description=gettext_lazy("results"))
    def recent_results(self, obj: PeriodicTask) -> str:
        url = results_url(self.admin_site.name, obj.name)
        if url is None:
            return "-"
        return format_html('<a href="{}">{}</a>', url, _("Recent results"))

    @admin.action(
        description=gettext_lazy("Run selected periodic tasks now"), permissions=["change"]
    )
    def run_now(self, request, queryset):
        # get_actions() already hides the action; this also refuses a hand-made POST and a
        # subclass that offers every action.
        if not self.has_change_permission(request):
            raise PermissionDenied
        app = self.get_celery_app()
        app.loader.import_default_modules()
        tasks = list(queryset.order_by("name"))
        if not confirmed(request):
            return self._confirm(request, tasks)
        sent = 0
        with app.producer_or_acquire() as producer:
            for task in tasks:
                try:
                    args, kwargs, options = beat_call(task)
                except ValueError as exc:
                    self.log_change(request, task, f"Run now: not sent, invalid JSON: {exc}")
                    self.message_user(
                        request,
                        format_html("{}: {} {}", task.name, _("not sent, invalid JSON:"), exc),
                        messages.WARNING,
                    )
                    continue
                result = self._send(app, task.task, args, kwargs, producer, options)
                sent += 1
                self.log_change(request, task, f"Run now: sent as {result.id}")
                url = results_url(self.admin_site.name, task.name)
                self.message_user(
                    request,
                    format_html(
                        '{}: {} <a href="{}">{}</a>', task.name, _("sent as"), url or "#", result.id
                    ),
                    messages.SUCCESS,
                )
        self.message_user(
            request,
            _("Sent %(sent)d of %(count)d periodic tasks.") % {"sent": sent, "count": len(tasks)},
            messages.INFO,
        )
        return None

    @staticmethod
    def _send(app: Any, name: str, args: list, kwargs: dict, producer: Any, options: dict):
        # As beat's scheduler: a registered task applies its own defaults and routes.
        task = app.tasks.get(name)
        if task is not None:
            return task.apply_async(args, kwargs, producer=producer, **options)
        return app.send_task(name, args, kwargs, producer=producer, **options)

    def _confirm(self, request, tasks: list[PeriodicTask]) -> TemplateResponse:
        lines = []
        for task in tasks:
            try:
                _args, _kwargs, options = beat_call(task)
            except ValueError as exc:
                text, ok = _("refused: invalid JSON: %(error)s") % {"error": exc}, False
            else:
                routing = ", ".join(f"{k}={v}" for k, v in options.items() if k != "headers")
                text, ok = _("will be sent now (%(routing)s)") % {"routing": routing or "-"}, True
            lines.append(Line(task.name, task.task, "", text, ok))
        return confirmation(
            self,
            request,
            action="run_now",
            title=_("Run periodic tasks now"),
            button=ngettext(
                "Yes, run %(count)d task now", "Yes, run %(count)d tasks now", len(tasks)
            )
            % {"count": len(tasks)},
            lines=lines,
        )


def override_beat_admin(site: admin.AdminSite) -> None:
    """Register ``CustomPeriodicTaskAdmin`` on ``site`` in place of beat's own admin."""
    # django-celery-beat registers its admin when its admin module is imported:
    # import it first so that the order of INSTALLED_APPS does not matter.
    import django_celery_beat.admin  # noqa: F401

    if site.is_registered(PeriodicTask):
        site.unregister(PeriodicTask)
    site.register(PeriodicTask, CustomPeriodicTaskAdmin)
