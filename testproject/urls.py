from django.contrib import admin
from django.urls import path

from testproject.demo import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("demo/send-tasks/", views.send_tasks),
    path("demo/publish/", views.publish),
    path("demo/publish-in-request/", views.publish_in_request),
]
