"""Tasks used by the demo, the tests and the benchmarks."""

import os
import time
from pathlib import Path

from celery import shared_task

from django_celery_fulldbresult.tasks import ScheduledTask


@shared_task
def add(x, y):
    return x + y


@shared_task
def echo(*args, **kwargs):
    """Return what it was called with (typed values round-trip through the message)."""
    return {"args": list(args), "kwargs": kwargs}


@shared_task
def noop():
    return None


@shared_task
def fail(message="boom"):
    raise ValueError(message)


@shared_task
def read_file(path):
    """Fails while ``path`` does not exist: retried from the admin once it does."""
    return Path(path).read_text()


@shared_task(bind=True, max_retries=3, default_retry_delay=0)
def flaky(self, succeed_on=2, countdown=0):
    """Retries until attempt ``succeed_on`` (0-based), each retry ``countdown`` seconds
    later, then succeeds."""
    if self.request.retries < succeed_on:
        raise self.retry(
            exc=RuntimeError(f"attempt {self.request.retries} failed"), countdown=countdown
        )
    return f"succeeded after {self.request.retries} retries"


@shared_task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@shared_task(bind=True)
def progress(self, steps=3, pause=0.05):
    for step in range(steps):
        self.update_state(state="PROGRESS", meta={"step": step, "of": steps})
        time.sleep(pause)
    return steps


@shared_task
def unserialisable():
    return object()


@shared_task(store_args=False)
def charge_card(card_number, amount):
    return f"charged {amount}"


@shared_task
def pid():
    return os.getpid()


@shared_task
def tsum(values):
    return sum(values)


@shared_task(bind=True)
def grow_chord(self, extra=2):
    """A chord header task that adds ``extra`` more parts to its chord (``add(i, i)``)."""
    for index in range(extra):
        self.add_to_chord(add.si(index, index))
    return 0


@shared_task(ignore_result=True)
def record_ignored(value=None):
    """``record_run`` whose result nobody wants (``ignore_result=True``)."""
    from testproject.demo.models import Run

    Run.objects.create(task_id=record_ignored.request.id, pid=os.getpid())
    return value


@shared_task(bind=True, max_retries=2)
def retry_in_atomic(self):
    """Records each attempt, then retries from inside ``transaction.atomic()`` (a task that
    does its work in a transaction and retries when it fails)."""
    from django.db import transaction

    from testproject.demo.models import Run

    Run.objects.create(task_id=self.request.id, pid=os.getpid())
    with transaction.atomic():
        raise self.retry(exc=RuntimeError(f"attempt {self.request.retries}"), countdown=1)


@shared_task(ignore_result=True)
def fire_and_forget():
    return "ignored"


@shared_task
def spawn(count=2):
    """Send ``count`` subtasks; they become the task's children."""
    return [add.delay(i, i).id for i in range(count)]


@shared_task(bind=True)
def record_run(self, value=None):
    """Record this execution (tests count them), then return ``value``."""
    from django.utils import timezone

    from testproject.demo.models import Run

    Run.objects.create(task_id=self.request.id, pid=os.getpid(), ran_at=timezone.now())
    return value


@shared_task(base=ScheduledTask)
def scheduled_add(x, y):
    """Uses the scheduler's base class (no monkey patch needed)."""
    return x + y


@shared_task(bind=True, max_retries=2)
def always_retry(self):
    """Records each attempt, then retries in 1 s until max_retries is exceeded."""
    from testproject.demo.models import Run

    Run.objects.create(task_id=self.request.id, pid=os.getpid())
    raise self.retry(exc=RuntimeError(f"attempt {self.request.retries}"), countdown=1)


@shared_task
def needs_marker(marker):
    """Fails until a ``Run`` row with task_id ``marker`` exists: a failure an operator
    can fix, then retry from the admin."""
    from testproject.demo.models import Run

    if not Run.objects.filter(task_id=marker).exists():
        raise LookupError(f"marker {marker!r} is missing")
    return marker


def _log_run(task_id: str, attempt: int) -> None:
    """Append this execution to the run log (soak suite): one file per process, one line per
    run, outside the database so that database faults can neither hide nor fake a run."""
    folder = os.environ.get("FULLDB_RUN_LOG")
    if not folder:
        return
    line = f"{task_id} {attempt} {time.time():.6f} {os.getpid()}\n"
    with open(os.path.join(folder, f"{os.getpid()}.log"), "a") as log:
        log.write(line)


@shared_task(bind=True, max_retries=None)
def soak_step(self, fail_times=0, pause=0.0, retry_countdown=1, max_retries=3):
    """Logs the run; fails and retries ``fail_times`` times (in ``retry_countdown`` s), then
    succeeds; ends in FAILURE when that needs more than ``max_retries`` retries."""
    _log_run(self.request.id, self.request.retries)
    if pause:
        time.sleep(pause)
    if self.request.retries < fail_times:
        raise self.retry(
            exc=RuntimeError(f"attempt {self.request.retries} failed"),
            countdown=retry_countdown,
            max_retries=max_retries,
        )
    return self.request.retries


@shared_task(bind=True)
def soak_size(self, data):
    """Logs the run and returns the length of ``data`` (large arguments)."""
    _log_run(self.request.id, self.request.retries)
    return len(data)


@shared_task(bind=True)
def record_then_sleep(self, seconds=0.0):
    """Records this execution, then sleeps ``seconds`` on its first run only: a task a
    worker can be killed in, that ends at once when it is sent again (recovery tests)."""
    from testproject.demo.models import Run

    Run.objects.create(task_id=self.request.id, pid=os.getpid())
    if Run.objects.filter(task_id=self.request.id).count() == 1:
        time.sleep(seconds)
    return seconds
