from celery import shared_task


@shared_task
def add(x, y):
    return x + y


try:  # Django 6.0+
    from django.tasks import task
except ImportError:  # Django 4.2 / 5.2: the django-tasks backport
    from django_tasks import task


@task
def double(x):
    """Written for Django's Tasks framework; the Celery workers run it."""
    return 2 * x
