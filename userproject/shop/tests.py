"""What a user's Django tests do with the backend, publish tracking and the scheduler:
plain ``TestCase`` and ``TransactionTestCase``, nothing from django-celery-fulldbresult's
own test suite. Run by ``manage.py test shop``."""

import time
import uuid
from datetime import timedelta

from celery import states
from celery.contrib.testing.worker import start_worker
from django.db import transaction
from django.test import TestCase, TransactionTestCase
from django.utils import timezone
from kombu import Queue
from shopsite.celery import app

from django_celery_fulldbresult.models import TaskResultMeta
from django_celery_fulldbresult.scheduler import forward_due, send_now

from .tasks import add, double


class NothingLeftOver:
    """Each test starts with an empty table: rows of an earlier test are gone."""

    def setUp(self):
        super().setUp()
        left = list(TaskResultMeta.objects.values_list("task_id", "status"))
        self.assertEqual(left, [], "rows left over by an earlier test")


class TheBackendInATestCase(NothingLeftOver, TestCase):
    def test_a_result_stored_by_the_backend_is_visible_in_the_test(self):
        task_id = str(uuid.uuid4())
        app.backend.store_result(task_id, 42, states.SUCCESS)
        self.assertEqual(app.AsyncResult(task_id).get(timeout=5), 42)
        self.assertTrue(TaskResultMeta.objects.filter(task_id=task_id).exists())

    def test_a_row_the_test_creates_is_what_asyncresult_reads(self):
        task_id = str(uuid.uuid4())
        TaskResultMeta.objects.create(task_id=task_id, status=states.STARTED)
        self.assertEqual(app.AsyncResult(task_id).state, states.STARTED)

    def test_storing_to_a_row_the_test_holds_does_not_wait_on_itself(self):
        task_id = str(uuid.uuid4())
        app.backend.store_result(task_id, None, states.STARTED)
        with transaction.atomic():
            TaskResultMeta.objects.select_for_update().get(task_id=task_id)
            app.backend.store_result(task_id, 7, states.SUCCESS)
        self.assertEqual(app.AsyncResult(task_id).get(timeout=5), 7)

    def test_a_published_task_has_its_pending_row(self):
        result = add.delay(1, 2)
        self.assertEqual(TaskResultMeta.objects.get(task_id=result.id).status, states.PENDING)
        self.assertEqual(result.state, states.PENDING)

    def test_a_django_task_enqueued_has_its_row(self):
        result = double.enqueue(21)
        row = TaskResultMeta.objects.get(task_id=result.id)
        self.assertEqual((row.status, row.task, row.args), ("PENDING", "shop.tasks.double", [21]))
        self.assertEqual(double.get_result(result.id).args, [21])

    def test_a_delayed_task_waits_as_a_scheduled_row(self):
        result = add.apply_async((1, 2), countdown=3600)
        row = TaskResultMeta.objects.get(task_id=result.id)
        self.assertEqual((row.status, row.task), ("SCHEDULED", "shop.tasks.add"))


class WithAWorker:
    """A real worker in the test process for the class's tests (Celery's ``start_worker``),
    as Celery's testing guide shows."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Tasks earlier tests published with no worker running are still in the queue: a
        # worker would run them now and commit their rows before this class's first test.
        app.control.purge()
        # shutdown_timeout: over RabbitMQ, Celery's worker loop notices the stop only when
        # its poll returns, up to 10 s after the last message: start_worker's default.
        cls.worker = start_worker(
            app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30
        )
        cls.worker.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.worker.__exit__(None, None, None)
        super().tearDownClass()


class TheBackendWithAWorker(WithAWorker, NothingLeftOver, TransactionTestCase):
    """The worker's rows are committed, visible to the test, and flushed after it."""

    def test_a_task_runs_and_its_row_is_visible(self):
        result = add.delay(2, 2)
        self.assertEqual(result.get(timeout=30), 4)
        row = TaskResultMeta.objects.get(task_id=result.id)
        self.assertEqual((row.status, row.task), (states.SUCCESS, "shop.tasks.add"))

    def test_and_again_from_an_empty_table(self):
        self.assertEqual(add.delay(3, 3).get(timeout=30), 6)

    def test_a_django_task_runs_on_the_worker(self):
        result = double.enqueue(21)
        deadline = time.monotonic() + 30
        while not result.is_finished and time.monotonic() < deadline:
            time.sleep(0.1)
            result.refresh()
        self.assertEqual((result.status, result.return_value), ("SUCCESSFUL", 42))
        self.assertEqual(len(result.worker_ids), 1)


#: A queue no worker of these tests consumes: the scheduler's tests take their messages back.
HELD = "shop-held"


def taken(queue_name):
    """The ids of the messages waiting in ``queue_name`` (taken off the broker)."""
    ids = []
    with app.connection_for_write() as conn:
        queue = Queue(queue_name)(conn.default_channel)
        queue.declare()
        while (message := queue.get(no_ack=True)) is not None:
            ids.append(message.headers["id"])
    return ids


class TheSchedulerInATestCase(NothingLeftOver, TestCase):
    """Send now and a forwarding run, called from a test: they see the test's rows (no
    refusal for being inside the test's transaction, no second connection that cannot see
    them) and their writes are rolled back with the test."""

    def test_send_now_forwards_a_delayed_task(self):
        result = add.apply_async((1, 2), countdown=3600, queue=HELD)
        self.assertEqual(send_now(app, [result.id]), {result.id: "sent"})
        self.assertEqual(TaskResultMeta.objects.get(task_id=result.id).status, "SCHEDULED_SENT")
        self.assertEqual(taken(HELD), [result.id])

    def test_a_forwarding_run_sends_what_is_due(self):
        result = add.apply_async((2, 3), countdown=3600, queue=HELD)
        TaskResultMeta.objects.filter(task_id=result.id).update(
            eta=timezone.now() - timedelta(seconds=1)
        )
        self.assertEqual(forward_due(app).sent, 1)
        self.assertEqual(TaskResultMeta.objects.get(task_id=result.id).status, "SCHEDULED_SENT")
        self.assertEqual(taken(HELD), [result.id])
