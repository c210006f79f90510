"""A read-only admin for task records (actions, filters and dashboard: see issue 4)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from .models import TaskResultMeta


class TaskResultMetaAdmin(admin.ModelAdmin):
    list_display = ("task_id", "task", "status", "date_submitted", "date_done", "eta", "hostname")
    list_filter = ("status",)
    search_fields = ("=task_id", "^task")
    show_full_result_count = False
    ordering = ("-id",)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def get_urls(self):
        # Minimal hook for the dashboard (the admin branch owns the final version).
        from .dashboard import dashboard_view

        view = self.admin_site.admin_view(lambda request: dashboard_view(request, self))
        name = f"{self.opts.app_label}_{self.opts.model_name}_dashboard"
        return [path("dashboard/", view, name=name), *super().get_urls()]


admin.site.register(TaskResultMeta, TaskResultMetaAdmin)
