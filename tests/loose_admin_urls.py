"""An admin site whose ModelAdmins offer every action to everybody (``get_actions``
overridden, as a project's subclass might): only each action's own check stands."""

from django.contrib.admin import AdminSite
from django.urls import path
from django_celery_beat.models import PeriodicTask

from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin, TaskResultMetaAdmin
from django_celery_fulldbresult.models import TaskResultMeta


class EveryActionForEverybody:
    def get_actions(self, request):
        return {name: (func, name, text) for func, name, text in self._get_base_actions()}


class LooseTaskAdmin(EveryActionForEverybody, TaskResultMetaAdmin):
    pass


class LoosePeriodicTaskAdmin(EveryActionForEverybody, CustomPeriodicTaskAdmin):
    pass


site = AdminSite(name="loose")
site.register(TaskResultMeta, LooseTaskAdmin)
site.register(PeriodicTask, LoosePeriodicTaskAdmin)

urlpatterns = [path("loose-admin/", site.urls)]
