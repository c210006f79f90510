"""A read-only admin for task records (actions, filters and dashboard: see issue 4)."""

from __future__ import annotations

from django.contrib import admin

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


admin.site.register(TaskResultMeta, TaskResultMetaAdmin)
