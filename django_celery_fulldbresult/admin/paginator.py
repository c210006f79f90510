"""A changelist paginator that never counts the whole task table.

``COUNT(*)`` over a million rows costs more than the page itself. Unfiltered,
the count is PostgreSQL's planner estimate (``pg_class.reltuples``, kept by
autovacuum/ANALYZE); filtered, or elsewhere, it is an exact count capped at
``COUNT_LIMIT`` rows (``SELECT COUNT(*) FROM (... ORDER BY ... LIMIT n)``),
which the index serving the page serves too.
"""

from __future__ import annotations

from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property

#: Rows counted at most for a filtered list; more are shown as "10000+".
COUNT_LIMIT = 10_000


def table_estimate(queryset) -> int | None:
    """The planner's row estimate of the queryset's table (PostgreSQL), or None."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            [connection.ops.quote_name(queryset.model._meta.db_table)],
        )
        row = cursor.fetchone()
    # -1: never analysed; small tables are counted exactly anyway.
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None


class EstimatedCountPaginator(Paginator):
    """``count`` is an estimate (unfiltered, PostgreSQL) or exact up to ``COUNT_LIMIT``."""

    count_limit = COUNT_LIMIT

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        self.count_is_exact = True
        if not queryset.query.where:
            estimate = table_estimate(queryset)
            if estimate is not None and estimate > self.count_limit:
                self.count_is_exact = False
                return estimate
        # The page's ordering is kept: the planner then walks the same index as the page
        # (newest first) instead of scanning the table from its oldest rows.
        counted = queryset[: self.count_limit + 1].count()
        if counted > self.count_limit:
            self.count_is_exact = False
            return self.count_limit
        return counted
