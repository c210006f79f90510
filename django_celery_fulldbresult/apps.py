from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class FullDBResultConfig(AppConfig):
    name = "django_celery_fulldbresult"
    verbose_name = _("Celery task results")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery import signals

        from . import conf, db, heartbeat, publish, scheduling

        db.install_fork_handler()
        if conf.get("MONKEY_PATCH_ASYNC"):
            scheduling.patch_send_task()
        # Receivers stay connected; each checks its setting on every call so
        # override_settings can switch the features on and off.
        signals.before_task_publish.connect(
            publish.on_before_publish, dispatch_uid="fulldbresult.before_publish"
        )
        signals.after_task_publish.connect(
            publish.on_after_publish, dispatch_uid="fulldbresult.after_publish"
        )
        signals.worker_ready.connect(heartbeat.on_worker_ready, dispatch_uid="fulldbresult.hb")
        signals.worker_shutdown.connect(
            heartbeat.on_worker_shutdown, dispatch_uid="fulldbresult.hb_stop"
        )
