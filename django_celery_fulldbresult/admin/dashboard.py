"""The admin dashboard: the figures of ``stats()`` and a chart of the last 24 hours.

Server-rendered (an inline SVG; no JavaScript, no build step). Hooked by
``TaskResultMetaAdmin.get_urls`` at ``<admin>/django_celery_fulldbresult/
taskresultmeta/dashboard/`` (URL name ``admin:django_celery_fulldbresult_
taskresultmeta_dashboard``); needs the view permission on task results.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _

from .. import stats as stats_module
from ..states import FAILURE, SUCCESS

TEMPLATE = "admin/django_celery_fulldbresult/taskresultmeta/dashboard.html"
CHART_HOURS = 24
#: ``?hours=`` accepted for the figures (the chart always shows the last 24 hours), from an
#: operator (a superuser, or a user allowed any of the task actions).
MAX_WINDOW_HOURS = 24 * 31
#: ... and from a user who may only view task results: every page view runs the statements
#: of ``stats()`` over the window, which is no view-only user's call to widen.
VIEWER_MAX_HOURS = 24
#: The task permissions that make a user an operator here.
OPERATOR_PERMISSIONS = ("retry", "cancel", "send_now", "revoke")
#: Task names listed; the rest is summed up in one line.
MAX_TASK_ROWS = 200

# Chart geometry (SVG user units).
WIDTH, HEIGHT = 760, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 12, 28


def duration_text(seconds: float | None) -> str:
    """A run time or a lateness, readable at a glance (``850 ms``, ``4.2 s``, ``3 h 5 min``)."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def percent_text(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f} %"


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 × 10^n that is at least ``value`` (the chart's top)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def chart(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """Bar geometry for the template: completions stacked under failures, per hour."""
    top = nice_ceiling(max((b[SUCCESS] + b[FAILURE] for b in buckets), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(buckets), 1)
    bars = []
    for index, bucket in enumerate(buckets):
        succeeded, failed = bucket[SUCCESS], bucket[FAILURE]
        ok_h = plot_h * succeeded / top
        fail_h = plot_h * failed / top
        base = TOP + plot_h
        start = (
            timezone.localtime(bucket["hour"])
            if timezone.is_aware(bucket["hour"])
            else (bucket["hour"])
        )
        bars.append(
            {
                "x": round(LEFT + index * slot + slot * 0.1, 2),
                "width": round(slot * 0.8, 2),
                "ok_y": round(base - ok_h, 2),
                "ok_h": round(ok_h, 2),
                "fail_y": round(base - ok_h - fail_h, 2),
                "fail_h": round(fail_h, 2),
                "label": start.strftime("%H:00"),
                "label_x": round(LEFT + index * slot + slot / 2, 2),
                "show_label": index % 3 == 0 or index == len(buckets) - 1,
                "title": _("%(hour)s: %(ok)d succeeded, %(failed)d failed")
                % {"hour": start.strftime("%Y-%m-%d %H:00"), "ok": succeeded, "failed": failed},
                "succeeded": succeeded,
                "failed": failed,
            }
        )
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "base": HEIGHT - BOTTOM,
        "mid": TOP + (HEIGHT - TOP - BOTTOM) / 2,
        "label_y": HEIGHT - BOTTOM + 16,
        "max": top,
        "half": f"{top / 2:g}",
        "bars": bars,
        "succeeded": sum(b["succeeded"] for b in bars),
        "failed": sum(b["failed"] for b in bars),
    }


def _parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def window_limit(request: HttpRequest, model_admin: Any) -> int:
    """The widest ``?hours=`` this user may ask for."""
    operator = request.user.is_superuser or any(
        getattr(model_admin, f"has_{name}_permission")(request) for name in OPERATOR_PERMISSIONS
    )
    return MAX_WINDOW_HOURS if operator else VIEWER_MAX_HOURS


def _window_hours(request: HttpRequest, limit: int) -> int:
    try:
        hours = int(request.GET.get("hours", CHART_HOURS))
    except ValueError:
        return CHART_HOURS
    return min(max(hours, 1), limit)


def _task_rows(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, figures in list(tasks.items())[:MAX_TASK_ROWS]:
        run = figures["runtime"] or {}
        rows.append(
            {
                "name": name,
                "total": figures["total"],
                "states": figures["states"],
                "failure_rate": percent_text(figures["failure_rate"]),
                "failing": bool(figures["states"].get(FAILURE)),
                "p50": duration_text(run.get("p50")),
                "p90": duration_text(run.get("p90")),
                "p99": duration_text(run.get("p99")),
            }
        )
    return rows


def dashboard_view(request: HttpRequest, model_admin: Any) -> HttpResponse:
    """The dashboard page; staff with the view permission on task results only."""
    site = model_admin.admin_site
    if not site.has_permission(request):
        return redirect_to_login(
            request.get_full_path(), reverse("admin:login", current_app=site.name)
        )
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    limit = window_limit(request, model_admin)
    hours = _window_hours(request, limit)
    queryset = model_admin.model._default_manager.all()
    now = timezone.now()
    figures = stats_module.collect(queryset, timedelta(hours=hours), now=now)
    runtime, scheduled, stale = figures["runtime"], figures["scheduled"], figures["stale"]
    opts = model_admin.model._meta
    context = {
        **site.each_context(request),
        "title": _("Task results dashboard"),
        "opts": opts,
        "app_label": opts.app_label,
        "has_view_permission": True,
        "changelist_url": reverse(
            f"admin:{opts.app_label}_{opts.model_name}_changelist", current_app=site.name
        ),
        "hours": hours,
        "hours_limit": limit,
        "hours_limited": str(hours) != request.GET.get("hours", str(hours)),
        "window_start": now - timedelta(hours=hours),
        "now": now,
        "oldest_due_eta": _parse(scheduled["oldest_due_eta"]),
        "stats": figures,
        "failure_rate": percent_text(figures["failure_rate"]),
        "runtime": {
            "p50": duration_text(runtime["p50"]),
            "p90": duration_text(runtime["p90"]),
            "p99": duration_text(runtime["p99"]),
            "runs": runtime["runs"],
            "exact": runtime["exact"],
            # merged from hourly histograms: each figure within this much of the exact one
            "within": (
                f"{runtime['relative_error'] * 100:.1f} %"
                if runtime["method"] == "histogram"
                else None
            ),
        },
        "lateness": duration_text(scheduled["lateness_seconds"]) if scheduled["due"] else "–",
        "stale_after": duration_text(stale["after_seconds"]),
        "tasks": _task_rows(figures["tasks"]),
        "more_tasks": max(len(figures["tasks"]) - MAX_TASK_ROWS, 0),
        "chart": chart(stats_module.hourly(queryset, CHART_HOURS, now=now)),
    }
    request.current_app = site.name
    return TemplateResponse(request, TEMPLATE, context)
