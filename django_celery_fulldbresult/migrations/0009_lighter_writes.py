"""Fewer index entries per write of the task table.

Every state a task goes through is a new row version, which adds an entry to every index
whose condition it meets (an update that changes ``status`` is never HOT). Here:

* ``fdr_state_eta_idx`` (status, eta) is merged into ``fdr_scheduled_eta_idx``, now
  (status, eta) of SCHEDULED rows: only scheduled rows pay for it, and MySQL, which ignores
  the condition, keeps the plain (status, eta) index it used;
* ``fdr_done_idx`` and ``fdr_retried_from_idx`` keep only the rows that have a value (final
  rows, copies of retried tasks): a task's earlier writes skip them;
* on PostgreSQL, the ``varchar_pattern_ops`` index Django adds beside the unique ``task_id``
  (for ``LIKE`` queries, which nothing runs on task ids) is dropped. Django knows nothing of
  it in its migration state; a later migration altering ``task_id`` would add it back (and
  must drop it again).

A typical task's three writes (PENDING, STARTED, SUCCESS) go from 29 index entries to 18 on
PostgreSQL. On a large table, run this migration at a quiet time: it rebuilds three indexes.
"""

from django.db import migrations, models, router

#: Django's name for it (``_create_index_name`` of the table, ``task_id`` and ``_like``).
TASK_ID_LIKE_INDEX = "django_celery_fulldbresult_taskresultmeta_task_id_b0b1245d_like"


def _postgresql_task_table(apps, schema_editor) -> str | None:
    connection = schema_editor.connection
    model = apps.get_model("django_celery_fulldbresult", "TaskResultMeta")
    if connection.vendor != "postgresql" or not router.allow_migrate_model(connection.alias, model):
        return None
    return schema_editor.quote_name(model._meta.db_table)


def drop_task_id_like_index(apps, schema_editor):
    if _postgresql_task_table(apps, schema_editor):
        schema_editor.execute(
            f"DROP INDEX IF EXISTS {schema_editor.quote_name(TASK_ID_LIKE_INDEX)}"
        )


def add_task_id_like_index(apps, schema_editor):
    table = _postgresql_task_table(apps, schema_editor)
    if table:
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {schema_editor.quote_name(TASK_ID_LIKE_INDEX)}"
            f" ON {table} (task_id varchar_pattern_ops)"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("django_celery_fulldbresult", "0008_stats_hours"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="taskresultmeta",
            name="fdr_scheduled_eta_idx",
        ),
        migrations.RemoveIndex(
            model_name="taskresultmeta",
            name="fdr_done_idx",
        ),
        migrations.RemoveIndex(
            model_name="taskresultmeta",
            name="fdr_state_eta_idx",
        ),
        migrations.RemoveIndex(
            model_name="taskresultmeta",
            name="fdr_retried_from_idx",
        ),
        migrations.AddIndex(
            model_name="taskresultmeta",
            index=models.Index(
                condition=models.Q(("status", "SCHEDULED")),
                fields=["status", "eta"],
                name="fdr_scheduled_eta_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="taskresultmeta",
            index=models.Index(
                condition=models.Q(("date_done__isnull", False)),
                fields=["date_done"],
                name="fdr_done_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="taskresultmeta",
            index=models.Index(
                condition=models.Q(("retried_from__isnull", False)),
                fields=["retried_from"],
                name="fdr_retried_from_idx",
            ),
        ),
        migrations.RunPython(drop_task_id_like_index, add_task_id_like_index, elidable=False),
    ]
