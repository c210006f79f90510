import logging

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _

logger = logging.getLogger(__name__)


class FullDBResultConfig(AppConfig):
    name = "django_celery_fulldbresult"
    verbose_name = _("Celery task results")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery import signals
        from django.core.signals import request_finished

        from . import conf, db, heartbeat, publish, publish_writer, receipt, scheduler

        db.install_fork_handler()
        if conf.get("SCHEDULE_ETA") or conf.get("MONKEY_PATCH_ASYNC"):
            # Only the Celery app configured from these settings: its send_task (with
            # MONKEY_PATCH_ASYNC) and its control.revoke. Other apps: scheduler.install(app).
            installed = scheduler.intercept.install_configured_app(
                send_task=bool(conf.get("MONKEY_PATCH_ASYNC"))
            )
            if installed is None and conf.get("MONKEY_PATCH_ASYNC"):
                logger.warning(
                    "MONKEY_PATCH_ASYNC: no Celery app using this result backend was current "
                    "when Django started; call django_celery_fulldbresult.scheduler.install(app)"
                )
        # Forwarded messages (and every message with RUN_ONCE): the attempt is taken before
        # it runs, so copies do not run and revoked rows stay revoked (receipt.py).
        signals.task_received.connect(receipt.on_task_received, dispatch_uid="fulldbresult.receipt")
        # Receivers stay connected; each checks its setting on every call so
        # override_settings can switch the features on and off.
        signals.before_task_publish.connect(
            publish.on_before_publish, dispatch_uid="fulldbresult.before_publish"
        )
        signals.after_task_publish.connect(
            publish.on_after_publish, dispatch_uid="fulldbresult.after_publish"
        )
        # The package's own connection follows Django's CONN_MAX_AGE / CONN_HEALTH_CHECKS
        # rules at the end of each web request and of each task (db.recycle).
        request_finished.connect(db.on_request_finished, dispatch_uid="fulldbresult.recycle")
        signals.task_postrun.connect(db.on_task_postrun, dispatch_uid="fulldbresult.recycle")
        signals.worker_ready.connect(heartbeat.on_worker_ready, dispatch_uid="fulldbresult.hb")
        signals.worker_shutdown.connect(
            heartbeat.on_worker_shutdown, dispatch_uid="fulldbresult.hb_stop"
        )
        # PENDING rows still queued (publish_writer) are written before a worker, or one of
        # its pool processes (which end with os._exit, skipping atexit), goes away.
        signals.worker_shutdown.connect(
            publish_writer.on_shutdown, dispatch_uid="fulldbresult.publish_flush"
        )
        signals.worker_process_shutdown.connect(
            publish_writer.on_shutdown, dispatch_uid="fulldbresult.publish_flush_child"
        )
        # The system checks (docs/ref/checks.rst) register themselves when imported.
        from . import checks  # noqa: F401
