"""Full, replayable task records for Celery in the Django database."""

from .states import (
    ALL_STATES,
    FINAL_STATES,
    SCHEDULED,
    SCHEDULED_SENT,
    TERMINAL_STATES,
    UNFINISHED_STATES,
)

__version__ = "1.0.0.dev0"

__all__ = [
    "ALL_STATES",
    "FINAL_STATES",
    "SCHEDULED",
    "SCHEDULED_SENT",
    "TERMINAL_STATES",
    "UNFINISHED_STATES",
    "__version__",
]
