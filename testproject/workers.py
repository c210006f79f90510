"""The ``celery worker`` command line of the test project (tests, soak and benches)."""

from __future__ import annotations

import sys


def worker_command(
    node: str,
    queues: str | None = None,
    pool: str = "prefork",
    concurrency: int = 2,
    loglevel: str = "INFO",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A worker of ``testproject`` named ``node``, consuming ``queues`` (comma-separated)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "testproject",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        node,
        f"--loglevel={loglevel}",
        # No chatter with other workers on the same broker (and no 1 s mingle wait).
        "--without-mingle",
        "--without-gossip",
        *extra,
    ]
    if queues:
        command += ["-Q", queues]
    return command
