from django.db import models


class Run(models.Model):
    """One row per execution of ``record_run``: tests count executions with it."""

    task_id = models.CharField(max_length=255, db_index=True)
    pid = models.IntegerField()
    ran_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.task_id} in {self.pid}"
