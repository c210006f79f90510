from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _sqlite_wal(sender, connection, **kwargs):
    # Worker processes and the web process write at the same time: WAL lets
    # readers go on while one connection writes.
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")


class DemoConfig(AppConfig):
    name = "testproject.demo"
    label = "demo"

    def ready(self):
        connection_created.connect(_sqlite_wal, dispatch_uid="demo.sqlite_wal")
