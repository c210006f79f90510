"""Where the time of a backend write and of a forwarded task goes: the loops the benchmarks
time, run in this process under cProfile, with this process's CPU per item (measured in a
run without the profiler) and the functions that take it.

* ``writes``: bench/stores.py's loop (PENDING with the request, STARTED, SUCCESS per task,
  through ``backend.store_result``) against ours, and the raw-upsert floor, on PostgreSQL;
* ``forwarding``: bench/scheduler.py's due rows forwarded by ``scheduler.forward_due``
  (batch 500, publisher confirms on), and plain ``apply_async`` of the same task.

Compare the CPU per item with the wall time per item of the same loop: the difference is
waiting (the database's or the broker's answer). The CPU of every PostgreSQL server process
in the same interval (``_common.cpu_by_group``, Linux) says how much of that wait is the
server's work (parse, plan, execute, index entries, WAL) rather than its commit flush. A
third run, profiled on the CPU clock, shares this process's CPU out by package (the package,
Django, psycopg, Celery, ...): the profiler's own cost per call inflates call-heavy code, so
read the shares rather than the microseconds.

    python bench/profiles.py writes [--tasks 1000] [--top 25]
    python bench/profiles.py forwarding [--rows 20000] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

_common.reexec_in_venv()


def measure(
    label: str,
    count: int,
    run: Callable[[], object],
    top: int,
    prepare: Callable[[], object] = lambda: None,
    clean: Callable[[], object] = lambda: None,
) -> None:
    """``run`` once timed, then profiled on the wall clock and on the CPU clock (each run
    between ``prepare`` and ``clean``, which are neither timed nor profiled); per item: wall,
    this process's CPU, the database server's CPU."""
    prepare()
    server = _common.cpu_by_group(None).get("postgres", 0.0)
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server = _common.cpu_by_group(None).get("postgres", 0.0) - server
    clean()
    print(
        f"== {label}: {count / wall:,.0f}/s; per item {wall / count * 1e6:,.0f} us wall, "
        f"{cpu / count * 1e6:,.0f} us CPU in this process, "
        f"{server / count * 1e6:,.0f} us CPU in PostgreSQL's server processes"
    )
    out = io.StringIO()
    profiled = profile(run, prepare, clean, cProfile.Profile())
    pstats.Stats(profiled, stream=out).sort_stats("cumulative").print_stats(top)
    print(out.getvalue())
    by_package(label, profile(run, prepare, clean, cProfile.Profile(time.process_time)), count)


def profile(
    run: Callable[[], object],
    prepare: Callable[[], object],
    clean: Callable[[], object],
    profiler: cProfile.Profile,
) -> cProfile.Profile:
    """``run`` under ``profiler``, between ``prepare`` and ``clean`` (neither profiled)."""
    prepare()
    profiler.enable()
    run()
    profiler.disable()
    clean()
    return profiler


#: Where a function's file lies -> the package it is counted in (first match wins).
PACKAGES = (
    ("/django_celery_fulldbresult/", "django-celery-fulldbresult"),
    ("/psycopg", "psycopg"),
    ("/django/", "django"),
    ("/asgiref/", "django"),  # its connections' thread locals
    ("/celery/", "celery"),
    ("/kombu/", "kombu"),
    ("/amqp/", "amqp"),
    ("/bench/", "this benchmark's loop"),
)


def by_package(label: str, profiler: cProfile.Profile, count: int) -> None:
    """This process's CPU (own time of each function, on the CPU clock) by package."""
    shares: dict[str, float] = {}
    for (path, _line, _name), (_cc, _nc, own, _cum, _callers) in pstats.Stats(
        profiler
    ).stats.items():  # type: ignore[attr-defined]
        package = next((name for key, name in PACKAGES if key in path), None)
        if package is None:
            package = "builtins (C)" if path == "~" else "standard library, other"
        shares[package] = shares.get(package, 0.0) + own
    total = sum(shares.values()) or 1.0
    print(f"== {label}: CPU by package (profiled on the CPU clock)")
    for package, own in sorted(shares.items(), key=lambda item: -item[1]):
        print(
            f"   {package:30s} {own / total:6.1%}  ({own / count * 1e6:,.0f} us per item profiled)"
        )
    print()


def writes(args: argparse.Namespace) -> None:
    import stores
    from celery import states

    _common.setup(_common.DB_NAME)
    from testproject.celery_app import app

    stores.create_floor_table()
    writers, _ = stores.build_writers(app)

    def loop(store: Callable) -> Callable[[], None]:
        def run() -> None:
            for i in range(args.tasks):
                task_id = str(uuid.uuid4())
                request = stores.make_request(task_id, i)
                store(task_id, None, states.PENDING, request)
                store(task_id, None, states.STARTED, request)
                store(task_id, 2 * i, states.SUCCESS, request)

        return run

    for name in ("ours", "floor (raw upsert)"):
        store, _table = writers[name]
        loop(store)()  # warm: connections, prepared statements
        measure(f"writes, {name}", 3 * args.tasks, loop(store), args.top)


def forwarding(args: argparse.Namespace) -> None:
    import scheduler as bench

    bench.setup()

    # As bench/scheduler.py: this process publishes no PENDING rows (plain apply_async).
    _common.set_setting("TRACK_PUBLISH", False)
    from django_celery_fulldbresult import scheduler
    from testproject.celery_app import app
    from testproject.demo.tasks import add

    template = bench.template_row()
    due = "now() - interval '1 hour' + s.g * interval '1 millisecond'"
    bench.purge_until_empty(app)
    bench.delete_bench_rows()

    def fill() -> None:
        bench.fill_scheduled(template, args.rows, "gen_random_uuid()::text", due)

    def forward() -> None:
        with bench.scheduler_on():
            scheduler.forward_due(app, batch_size=500)

    def empty() -> None:
        bench.purge_until_empty(app)
        bench.delete_bench_rows()

    def plain() -> None:
        with app.producer_or_acquire() as producer:
            for i in range(args.rows):
                add.apply_async((i, i), producer=producer)

    measure("forward_due, batch 500", args.rows, forward, args.top, prepare=fill, clean=empty)
    measure("plain apply_async", args.rows, plain, args.top, clean=empty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name, default in (("writes", ("--tasks", 1000)), ("forwarding", ("--rows", 20000))):
        command = sub.add_parser(name)
        command.add_argument(default[0], type=int, default=default[1])
        command.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    {"writes": writes, "forwarding": forwarding}[args.what](args)


if __name__ == "__main__":
    main()
