"""A custom admin site with the package's admin classes registered by hand (the README's recipe)."""

from django.contrib.admin import AdminSite
from django.urls import path
from django_celery_beat.models import PeriodicTask

from django_celery_fulldbresult.admin import CustomPeriodicTaskAdmin, TaskResultMetaAdmin
from django_celery_fulldbresult.models import TaskResultMeta

site = AdminSite(name="custom")
site.register(TaskResultMeta, TaskResultMetaAdmin)
site.register(PeriodicTask, CustomPeriodicTaskAdmin)

urlpatterns = [path("custom-admin/", site.urls)]
