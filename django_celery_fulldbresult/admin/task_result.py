"""The task admin: a read-only changelist and detail page that stay fast at millions of rows."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from celery import current_app
from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from .. import secrecy, serialization
from ..models import TaskResultMeta
from ..states import STARTED
from . import dashboard, filters
from .actions import ACTIONS
from .display import child_ids, duration, pre, pretty_json, state_badge
from .paginator import EstimatedCountPaginator

#: Columns the changelist reads (no arguments, results or tracebacks).
LIST_COLUMNS = (
    "id",
    "task_id",
    "task",
    "status",
    "date_submitted",
    "date_started",
    "date_done",
    "eta",
    "hostname",
)


class TaskChangeList(ChangeList):
    """Reads only the listed columns: the page never loads arguments or results."""

    def get_queryset(self, request, *args: Any, **kwargs: Any):
        # (*args: Django 5.0+ passes exclude_parameters for facets.)
        return super().get_queryset(request, *args, **kwargs).only(*LIST_COLUMNS)


class TaskResultMetaAdmin(admin.ModelAdmin):
    #: The Celery app that sends retries and revokes (None: ``celery.current_app``).
    celery_app = None

    list_display = (
        "task_id",
        "task",
        "state",
        "date_submitted",
        "date_started",
        "date_done",
        "run_time",
        "eta",
        "hostname",
    )
    list_filter = (
        filters.StateFilter,
        filters.TaskNameFilter,
        filters.PeriodicTaskFilter,
        filters.SubmittedFilter,
        filters.StaleFilter,
    )
    # See get_search_results: exact task id or name prefix, both indexed.
    search_fields = ("task_id", "task")
    search_help_text = _("An exact task id, or the beginning of a task name.")
    # No column sorting: every order but the indexed ones would sort the whole table.
    sortable_by = ()
    ordering = ("-id",)
    show_full_result_count = False
    if hasattr(admin, "ShowFacets"):  # Django 5.0+: a count per filter choice scans the table
        show_facets = admin.ShowFacets.NEVER
    paginator = EstimatedCountPaginator
    actions = ACTIONS
    fieldsets = (
        (
            _("Task"),
            {
                "fields": (
                    "task_id",
                    "task",
                    "state",
                    "periodic_task_name",
                    "hostname",
                    "retries",
                    "replay",
                )
            },
        ),
        (_("Lineage"), {"fields": ("lineage",)}),
        (
            _("Call"),
            {"fields": ("call_args", "call_kwargs", "argsrepr", "kwargsrepr", "call_options")},
        ),
        (_("Routing"), {"fields": ("queue", "exchange", "routing_key", "priority")}),
        (
            _("Outcome"),
            {"fields": ("outcome", "error_traceback", "content_type", "meta_json")},
        ),
        (
            _("Times"),
            {
                "fields": (
                    "date_submitted",
                    "eta",
                    "expires",
                    "date_started",
                    "date_done",
                    "run_time",
                    "date_modified",
                )
            },
        ),
    )
    readonly_fields = (
        "state",
        "replay",
        "lineage",
        "call_args",
        "call_kwargs",
        "call_options",
        "outcome",
        "error_traceback",
        "meta_json",
        "run_time",
    )

    # -- permissions: read-only; actions have their own ----------------------------

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def _has_perm(self, request, codename: str) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{codename}_{self.opts.model_name}")

    def has_retry_permission(self, request) -> bool:
        return self._has_perm(request, "retry")

    def has_cancel_permission(self, request) -> bool:
        return self._has_perm(request, "cancel")

    def has_send_now_permission(self, request) -> bool:
        return self._has_perm(request, "send_now")

    def has_revoke_permission(self, request) -> bool:
        return self._has_perm(request, "revoke")

    # -- changelist -------------------------------------------------------------

    def get_celery_app(self) -> Any:
        if self.celery_app is not None:
            return self.celery_app
        return current_app._get_current_object()

    def get_changelist(self, request, **kwargs):
        return TaskChangeList

    def get_ordering(self, request) -> tuple[str, ...]:
        # A state or stale filter: newest state change first, which the
        # (status, date_modified) and unfinished-rows indexes serve; by id the
        # database would walk the whole table for a rare state.
        if any(request.GET.get(name) for name in filters.BY_STATE_CHANGE):
            return ("-date_modified",)
        return self.ordering

    def get_search_results(self, request, queryset, search_term: str):
        """An exact task id or a task-name prefix, case-sensitive so that indexes serve them.

        (Django's ``=``/``^`` search prefixes compare case-insensitively, which no
        plain index serves.)
        """
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(task_id=term) | Q(task__startswith=term)), False

    def changelist_url(self, **params: str) -> str:
        url = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist",
            current_app=self.admin_site.name,
        )
        return f"{url}?{urlencode(params)}" if params else url

    @admin.display(description=_("state"))
    def state(self, obj: TaskResultMeta) -> str:
        return state_badge(obj.status)

    @admin.display(description=_("replayable"))
    def replay(self, obj: TaskResultMeta) -> str:
        if obj.replayable:
            return _("yes")
        return _("no: %(reason)s") % {"reason": secrecy.refusal(obj)}

    @admin.display(description=_("run time"))
    def run_time(self, obj: TaskResultMeta) -> str:
        if obj.date_started and not obj.date_done and obj.status == STARTED:
            return format_html("{} …", duration(obj.date_started, timezone.now()))
        return duration(obj.date_started, obj.date_done)

    # -- detail page ------------------------------------------------------------

    def _call(self, obj: TaskResultMeta) -> tuple[Any, Any, str | None]:
        if obj.packed_args is None:
            return obj.args, obj.kwargs, None
        accept = serialization.safe_accept(self.get_celery_app().conf.accept_content)
        if obj.packed_args_content_type not in accept:  # never unpickled in the web tier
            size = len(obj.packed_args)
            return None, None, serialization.not_decoded_text(obj.packed_args_content_type, size)
        try:
            args, kwargs = obj.get_call(accept)
        except Exception as exc:  # noqa: BLE001 - shown, not raised
            return None, None, f"packed ({obj.packed_args_content_type}), not shown: {exc}"
        return args, kwargs, None

    @admin.display(description=_("arguments"))
    def call_args(self, obj: TaskResultMeta) -> str:
        args, _kwargs, problem = self._call(obj)
        if not obj.replayable and args is None:
            return _("not stored (see the repr below)")
        return pre(problem) if problem else pretty_json(args)

    @admin.display(description=_("keyword arguments"))
    def call_kwargs(self, obj: TaskResultMeta) -> str:
        _args, kwargs, problem = self._call(obj)
        return pre(problem) if problem else pretty_json(kwargs)

    @admin.display(description=_("message options"))
    def call_options(self, obj: TaskResultMeta) -> str:
        return pretty_json(obj.options)

    @admin.display(description=_("meta"))
    def meta_json(self, obj: TaskResultMeta) -> str:
        return pretty_json(obj.meta)

    @admin.display(description=_("result"))
    def outcome(self, obj: TaskResultMeta) -> str:
        if obj.result is None:
            return "-"
        accept = serialization.safe_accept(self.get_celery_app().backend.accept)
        if obj.content_type and obj.content_type not in accept:  # never unpickled here
            return pre(serialization.not_decoded_text(obj.content_type, len(obj.result)))
        try:
            value = obj.get_result(accept)
        except Exception:  # noqa: BLE001 - show the stored text instead
            return pre(obj.result)
        try:
            return pretty_json(value)
        except (TypeError, ValueError):
            return pre(repr(value))

    @admin.display(description=_("traceback"))
    def error_traceback(self, obj: TaskResultMeta) -> str:
        return pre(obj.traceback)

    def _task_link(self, task_id: str, found: dict[str, dict]) -> str:
        row = found.get(task_id)
        if row is None:
            return format_html("<code>{}</code> ({})", task_id, _("no record"))
        url = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[row["pk"]],
            current_app=self.admin_site.name,
        )
        return format_html(
            '<a href="{}"><code>{}</code></a> {} {}',
            url,
            task_id,
            row["task"],
            state_badge(row["status"]),
        )

    @admin.display(description=_("related tasks"))
    def lineage(self, obj: TaskResultMeta) -> str:
        children = child_ids(obj.meta)
        single = {
            _("parent"): obj.parent_id,
            _("root"): obj.root_id if obj.root_id != obj.task_id else None,
            _("retried from"): obj.retried_from,
        }
        wanted = {value for value in single.values() if value} | set(children)
        columns = ("pk", "task_id", "task", "status")
        manager = TaskResultMeta.objects.using(obj._state.db)
        found = {r["task_id"]: r for r in manager.filter(task_id__in=wanted).values(*columns)}
        # The copies of this task, by the retried_from index.
        copies = list(manager.filter(retried_from=obj.task_id).order_by("id").values(*columns)[:50])
        found.update({r["task_id"]: r for r in copies})
        items = [(label, [value]) for label, value in single.items() if value]
        if children:
            items.append((_("children"), children))
        if copies:
            items.append((_("retried as"), [r["task_id"] for r in copies]))
        if obj.group_id:
            items.append((_("group"), None))
        if not items:
            return "-"
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "",
                "<li>{}: {}</li>",
                (
                    (
                        label,
                        format_html("<code>{}</code>", obj.group_id)
                        if ids is None
                        else format_html_join(
                            ", ", "{}", ((self._task_link(i, found),) for i in ids)
                        ),
                    )
                    for label, ids in items
                ),
            ),
        )

    # -- dashboard --------------------------------------------------------------

    def get_urls(self):
        name = f"{self.opts.app_label}_{self.opts.model_name}_dashboard"
        return [
            path("dashboard/", self.admin_site.admin_view(self.dashboard_view), name=name),
            *super().get_urls(),
        ]

    def dashboard_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        return dashboard.dashboard_view(request, self)

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "dashboard_url": self.dashboard_url()}
        return super().changelist_view(request, extra_context)

    def dashboard_url(self) -> str | None:
        try:
            return reverse(
                f"admin:{self.opts.app_label}_{self.opts.model_name}_dashboard",
                current_app=self.admin_site.name,
            )
        except NoReverseMatch:
            return None
