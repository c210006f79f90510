"""Result push (``push/``): on PostgreSQL, the listeners table and the trigger that notifies
waiters of the states written to the task table. Nothing on other databases."""

from django.db import migrations, router

from django_celery_fulldbresult.push import sql


def _run(statements, apps, schema_editor):
    connection = schema_editor.connection
    model = apps.get_model("django_celery_fulldbresult", "TaskResultMeta")
    if connection.vendor != "postgresql" or not router.allow_migrate_model(
        connection.alias, model
    ):
        return
    for statement in statements(schema_editor.quote_name(model._meta.db_table)):
        schema_editor.execute(statement, params=None)


def install(apps, schema_editor):
    _run(sql.install, apps, schema_editor)


def uninstall(apps, schema_editor):
    _run(sql.uninstall, apps, schema_editor)


class Migration(migrations.Migration):
    dependencies = [("django_celery_fulldbresult", "0006_receipt_and_leases")]

    operations = [migrations.RunPython(install, uninstall, elidable=False)]
