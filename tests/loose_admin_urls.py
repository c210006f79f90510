"""An admin site whose ModelAdmins offer every action to everybody (``get_actions``
overridden, as a project's subclass might): only each action's own check stands."""

from django.contrib.admin import AdminSite
from django.urls import path

from django_celery_fulldbresult.admin import TaskResultMetaAdmin
from django_celery_fulldbresult.models import TaskResultMeta

from .beat_support import INSTALLED as BEAT


class EveryActionForEverybody:
    # Django 6.1 passes where the actions are shown and returns Action objects (tuples before).
    def get_actions(self, request, action_location=None):
        if action_location is None:
            actions = self._get_base_actions()
        else:
            actions = self._get_base_actions(action_location)
        return {getattr(action, "name", None) or action[1]: action for action in actions}


class LooseTaskAdmin(EveryActionForEverybody, TaskResultMetaAdmin):
    pass


site = AdminSite(name="loose")
site.register(TaskResultMeta, LooseTaskAdmin)
if BEAT:
    from django_celery_beat.models import PeriodicTask

    from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin

    class LoosePeriodicTaskAdmin(EveryActionForEverybody, CustomPeriodicTaskAdmin):
        pass

    site.register(PeriodicTask, LoosePeriodicTaskAdmin)

urlpatterns = [path("loose-admin/", site.urls)]
