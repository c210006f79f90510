"""A custom admin site with the package's admin classes registered by hand (the README's recipe)."""

from django.contrib.admin import AdminSite
from django.urls import path

from django_celery_fulldbresult.admin import TaskResultMetaAdmin
from django_celery_fulldbresult.models import TaskResultMeta

from .beat_support import INSTALLED as BEAT

site = AdminSite(name="custom")
site.register(TaskResultMeta, TaskResultMetaAdmin)
if BEAT:
    from django_celery_beat.models import PeriodicTask

    from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin

    site.register(PeriodicTask, CustomPeriodicTaskAdmin)

urlpatterns = [path("custom-admin/", site.urls)]
