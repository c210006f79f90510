"""A publisher process: ``python -m soak.publisher --out FILE --count N [...]``.

Publishes ``soak_step`` tasks through ``apply_async`` (so publish tracking and,
with ``FULLDB_SCHEDULE_ETA=1``, the database scheduler are in the path) and
writes one JSON line per publish: id, kind, eta (epoch), whether it worked,
the error and how long the call took. Task ``i`` is:

* ``fail`` when ``i % 10 == 1`` (fails once, retries in 1 s, succeeds) and
  ``doomed`` when ``i % 10 == 6`` (fails twice with ``max_retries=1``: FAILURE);
* else ``delayed`` when ``i % 3 == 0`` (eta in ``--delay-min``..``--delay-max`` s);
* else ``now``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any


def kind_of(index: int, delayed: bool) -> str:
    if index % 10 == 1:
        return "fail"
    if index % 10 == 6:
        return "doomed"
    if delayed and index % 3 == 0:
        return "delayed"
    return "now"


def call_for(kind: str) -> dict[str, Any]:
    if kind == "fail":
        return {"fail_times": 1, "retry_countdown": 1, "max_retries": 3}
    if kind == "doomed":
        return {"fail_times": 5, "retry_countdown": 1, "max_retries": 1}
    return {}


def publish_one(task: Any, index: int, args: argparse.Namespace, rng: random.Random) -> dict:
    kind = kind_of(index, args.delayed)
    task_id = f"{args.prefix}-{index}-{uuid.uuid4().hex[:8]}"
    options: dict[str, Any] = {"task_id": task_id}
    eta = None
    if kind == "delayed":
        delay = rng.uniform(args.delay_min, args.delay_max)
        when = datetime.now(timezone.utc) + timedelta(seconds=delay)
        options["eta"] = when
        eta = when.timestamp()
    started = time.monotonic()
    record = {"id": task_id, "kind": kind, "eta": eta, "at": time.time()}
    try:
        task.apply_async(kwargs=call_for(kind), **options)
        record["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the error itself is the figure
        record.update(ok=False, error=f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
    record["elapsed"] = round(time.monotonic() - started, 3)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefix", default="p")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0, help="Publishes per second (0: max).")
    parser.add_argument("--no-delayed", dest="delayed", action="store_false")
    parser.add_argument("--delay-min", type=float, default=1.0)
    parser.add_argument("--delay-max", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    from testproject.demo.tasks import soak_step

    rng = random.Random(args.seed)
    pace = 1.0 / args.rate if args.rate else 0.0
    next_at = time.monotonic()
    with open(args.out, "w") as out:
        for index in range(args.count):
            if pace:
                next_at += pace
                time.sleep(max(0.0, next_at - time.monotonic()))
            out.write(json.dumps(publish_one(soak_step, index, args, rng)) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
