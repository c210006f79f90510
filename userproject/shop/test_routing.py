"""The task tables in a database of their own, behind a read-replica router that is listed
first (settings: ``FULLDB_USER_ROUTED=1``): the backend, the worker, the admin and its
actions, the dashboard, the commands and the stats all use the task database's primary.
Skipped in the unrouted runs."""

import io
from datetime import timedelta
from unittest import skipUnless

from celery import states
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connections
from django.test import TransactionTestCase
from django.urls import reverse

from django_celery_fulldbresult.models import TaskResultMeta

from .tasks import add
from .tests import WithAWorker

CHANGELIST = "admin:django_celery_fulldbresult_taskresultmeta_changelist"


@skipUnless(settings.ROUTED, "routed settings only (FULLDB_USER_ROUTED=1)")
class TheTaskDatabase(WithAWorker, TransactionTestCase):
    databases = {"default", "replica", "tasks"} if settings.ROUTED else {"default"}

    def test_the_tables_are_on_the_task_database_only(self):
        table = TaskResultMeta._meta.db_table
        self.assertIn(table, connections["tasks"].introspection.table_names())
        self.assertNotIn(table, connections["default"].introspection.table_names())

    def test_the_worker_and_the_backend(self):
        result = add.delay(2, 3)
        self.assertEqual(result.get(timeout=30), 5)
        row = TaskResultMeta.objects.get(task_id=result.id)
        self.assertEqual((row._state.db, row.status), ("tasks", states.SUCCESS))

    def test_the_admin_its_actions_and_the_dashboard(self):
        done = add.delay(1, 1)
        done.get(timeout=30)
        waiting = add.apply_async((1, 2), countdown=3600)
        self.client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
        page = self.client.get(reverse(CHANGELIST))
        self.assertContains(page, done.id)
        self.assertContains(page, waiting.id)
        row = TaskResultMeta.objects.get(task_id=done.id)
        change = reverse("admin:django_celery_fulldbresult_taskresultmeta_change", args=[row.pk])
        self.assertContains(self.client.get(change), done.id)
        dashboard = reverse("admin:django_celery_fulldbresult_taskresultmeta_dashboard")
        self.assertEqual(self.client.get(dashboard).status_code, 200)
        waiting_pk = TaskResultMeta.objects.get(task_id=waiting.id).pk
        action = {"action": "cancel_scheduled_tasks", "_selected_action": [waiting_pk]}
        self.assertContains(self.client.post(reverse(CHANGELIST), action), waiting.id)
        answer = self.client.post(reverse(CHANGELIST), {**action, "post": "yes"})
        self.assertEqual(answer.status_code, 302)
        self.assertEqual(TaskResultMeta.objects.get(task_id=waiting.id).status, states.REVOKED)

    def test_the_commands_and_the_stats(self):
        add.delay(4, 4).get(timeout=30)
        for command in ("task_stats", "find_stale_tasks", "find_stale_scheduled_tasks"):
            call_command(command, stdout=io.StringIO())
        out = io.StringIO()
        call_command("purge_task_results", "--days", "30", "--dry-run", stdout=out)
        stats = TaskResultMeta.objects.stats(timedelta(hours=1))
        self.assertEqual(stats["states"].get(states.SUCCESS), 1, stats)
