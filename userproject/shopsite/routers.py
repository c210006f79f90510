class ReadReplicaRouter:
    """A common read-replica router: every read to the replica, writes to the primary."""

    def db_for_read(self, model, **hints):
        return "replica"

    def db_for_write(self, model, **hints):
        return None

    def allow_relation(self, obj1, obj2, **hints):
        return True
