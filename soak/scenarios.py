"""The soak and fault scenarios (issue 5; 8 and 9: issue 15). Each returns an :class:`Outcome`.

Every scenario starts real processes (``celery worker``, ``manage.py
run_scheduler``, publisher processes) on the context's database and queue,
does its damage, then checks task by task, from the task table and from the
workers' run log (see ``soak_step``), that nothing was lost, duplicated or
misreported.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from billiard.exceptions import WorkerLostError

from . import harness
from .faultproxy import FaultProxy
from .harness import Context, Outcome

FINAL = ("SUCCESS", "FAILURE", "REVOKED")
#: (status, retries, runs) each publisher kind must end with.
EXPECTED = {
    "now": ("SUCCESS", 0, 1),
    "delayed": ("SUCCESS", 0, 1),
    "fail": ("SUCCESS", 1, 2),
    "doomed": ("FAILURE", 1, 2),
}


def _app() -> Any:
    from testproject.celery_app import app

    return app


def _check_published(
    out: Outcome, published: list[dict], runs: dict, states: dict, label: str = ""
) -> None:
    """Per task id: final state, retries, number of runs, and not before its eta."""
    wrong_state, wrong_runs, early = [], [], []
    for record in published:
        if not record.get("ok"):
            continue
        status, retries, count = EXPECTED[record["kind"]]
        got = states.get(record["id"])
        if got != (status, retries):
            wrong_state.append(f"{record['id']}:{got}")
        entries = runs.get(record["id"], [])
        if len(entries) != count:
            wrong_runs.append(f"{record['id']}:{len(entries)} runs")
        if record["eta"] is not None and entries and entries[0].at < record["eta"]:
            early.append(f"{record['id']} ran {record['eta'] - entries[0].at:.3f}s early")
        if count == 2 and len(entries) == 2 and entries[1].at - entries[0].at < 1.0:
            early.append(f"{record['id']} retried {entries[1].at - entries[0].at:.3f}s later")
    out.check(not wrong_state, f"{label}wrong final state: {len(wrong_state)} {wrong_state[:3]}")
    out.check(not wrong_runs, f"{label}wrong run count: {len(wrong_runs)} {wrong_runs[:3]}")
    out.check(not early, f"{label}ran before eta: {len(early)} {early[:3]}")


# -- 1. load --------------------------------------------------------------------------


def load(ctx: Context) -> Outcome:
    """4 publishers x 2 workers x 2 senders; a third delayed, a tenth fail and retry."""
    out = Outcome("1 load")
    size = ctx.sizes.load_tasks
    folder = ctx.folder("load")
    harness.purge(_app(), ctx.queue)
    on = {"FULLDB_SCHEDULE_ETA": "1"}
    with harness.stopping_all(ctx):
        for i in range(2):
            harness.start_worker(ctx, f"load{i}", folder, "prefork", 2, **on)
        for i in range(2):
            harness.start_sender(ctx, f"sender{i}", folder, **on)
        started = time.time()
        pubs = [
            harness.start_publisher(
                ctx,
                f"pub{i}",
                folder,
                f"--count={size // 4}",
                f"--delay-max={ctx.sizes.load_delay_max}",
                f"--seed={i}",
                **on,
            )
            for i in range(4)
        ]
        for proc, _ in pubs:
            proc.wait(timeout=1800)
        published = [r for _, path in pubs for r in harness.read_published(path)]
        publish_seconds = time.time() - started
        ids = [r["id"] for r in published if r.get("ok")]
        out.check(len(ids) == len(published) == 4 * (size // 4), "publishes failed or missing")

        def done() -> bool:
            return harness.count_in(ids, status__in=FINAL) >= len(ids)

        finished = harness.wait_until(done, timeout=600 + size / 20, interval=2.0)
        out.check(finished, "not every task reached a final state in time")
        time.sleep(2)  # a duplicate would show up in the run log now
    states = harness.states_of(ids)
    runs = harness.read_runs(folder)
    _check_published(out, published, runs, states)
    from django.db.models import Max

    from django_celery_fulldbresult.models import TaskResultMeta

    last = max(
        (
            TaskResultMeta.objects.filter(task_id__in=part).aggregate(m=Max("date_done"))["m"]
            for part in harness.chunks(ids)
        ),
        default=None,
    )
    pending = harness.count_in(ids, status="PENDING")
    out.check(pending == 0, f"{pending} PENDING rows left")
    kinds = Counter(r["kind"] for r in published)
    elapsed = (harness._epoch(last) - started) if last else float("nan")
    out.figures.update(
        tasks=len(ids),
        delayed=kinds["delayed"],
        retried=kinds["fail"] + kinds["doomed"],
        runs=sum(len(v) for v in runs.values()),
        publish_s=round(publish_seconds, 1),
        end_to_end_s=round(elapsed, 1),
        tasks_per_s=round(len(ids) / elapsed, 1) if last else 0,
        pending_left=pending,
    )
    return out


# -- 2. worker killed -----------------------------------------------------------------


def worker_killed(ctx: Context) -> Outcome:
    """SIGKILL a worker mid-task (prefork and solo; with and without acks_late)."""
    out = Outcome("2 worker-kill")
    for pool, acks_late in ctx.sizes.worker_kill_cases:
        _worker_kill_case(ctx, out, pool, acks_late)
    return out


def _worker_kill_case(ctx: Context, out: Outcome, pool: str, acks_late: bool) -> None:
    from testproject.demo.tasks import soak_step

    label = f"{pool}{'+acks_late' if acks_late else ''}"
    folder = ctx.folder(f"worker-kill-{label}")
    # A queue per case: a killed worker's unacknowledged messages (Redis keeps them aside
    # until the visibility timeout) must come back to this case's workers, not the next.
    ctx = dataclasses.replace(ctx, queue=f"{ctx.queue}-kill-{pool}-{int(acks_late)}")
    app = _app()
    harness.purge(app, ctx.queue)
    env = {
        "FULLDB_ACKS_LATE": "1" if acks_late else "0",
        "FULLDB_PREFETCH": "1",
        "FULLDB_HEARTBEAT": "1",
        "FULLDB_VISIBILITY_TIMEOUT": "6",  # Redis: unacked messages come back after 6 s
    }
    concurrency = 1 if pool == "solo" else 2
    count = ctx.sizes.worker_kill_tasks
    with harness.stopping_all(ctx):
        victim = harness.start_worker(ctx, f"victim-{pool}", folder, pool, concurrency, **env)
        ids = [
            soak_step.apply_async(kwargs={"pause": 0.6}, queue=ctx.queue).id for _ in range(count)
        ]

        def mid_task() -> bool:
            return harness.count_in(ids, status="SUCCESS") >= 1 and bool(
                harness.count_in(ids, status="STARTED")
            )

        out.check(harness.wait_until(mid_task, 60, 0.05), f"{label}: no task started")
        harness.kill(victim)
        harness.group_gone(victim)
        killed = {i for i, (s, _) in harness.states_of(ids).items() if s == "STARTED"}
        harness.start_worker(ctx, f"rescuer-{pool}", folder, pool, concurrency, **env)
        # Besides the running ones, the kill can take tasks whose message the victim held:
        # acked early but not started yet (acks_late off), or, on Redis, popped by its BRPOP
        # and not yet written to kombu's unacked hash. Those never run; their rows stay
        # PENDING and find_stale_tasks must report them. At most one prefetch window.
        window = concurrency + 1
        settled = harness.wait_until(
            lambda: harness.count_in(ids, status="SUCCESS") >= count - len(killed) - window, 90
        )
        out.check(settled, f"{label}: the other tasks did not finish")
        # Until nothing moves for longer than Redis's visibility timeout (6 s) plus a task.
        settled_count = _settled(lambda: harness.count_in(ids, status="SUCCESS"), quiet=8)
        out.check(settled_count is not None, f"{label}: tasks kept finishing for 90 s")
        time.sleep(7)  # the victim's heartbeat expires (2 s x 3 missed, see settings)
        stale = harness.stale_task_ids() & set(ids)
    states = harness.states_of(ids)
    runs = harness.read_runs(folder)
    unfinished = {i for i, (s, _) in states.items() if s != "SUCCESS"}
    lost = {i for i in unfinished - killed if not runs.get(i)}
    out.check(bool(killed), f"{label}: the kill hit no running task")
    out.check(stale == unfinished, f"{label}: find_stale_tasks reports {stale}, {unfinished}")
    out.check(unfinished <= killed | lost, f"{label}: unfinished {unfinished - killed - lost}")
    out.check(len(lost) <= window, f"{label}: {len(lost)} tasks lost, more than one window")
    if acks_late:
        out.check(not unfinished & killed, f"{label}: killed tasks were not re-run")
        if ctx.stack == "pg-rabbit":  # RabbitMQ keeps every unacknowledged message
            out.check(not lost, f"{label}: {len(lost)} messages lost with acks_late")
        # A killed task ran again: twice in all, or once if the kill came between its
        # STARTED write and its first line.
        rerun = {i for i in ids if len(runs.get(i, [])) == 2}
        out.check(rerun <= killed, f"{label}: {len(rerun - killed)} unkilled tasks ran twice")
        wrong = [i for i in killed if len(runs.get(i, [])) not in (1, 2)]
    else:
        # A killed task may still come back: its early ack can die with the connection
        # (SIGKILL resets it, the broker drops what it had not read yet).
        out.figures[f"{label}_redelivered"] = len(killed - unfinished)
        wrong = [i for i in killed if len(runs.get(i, [])) > (1 if i in unfinished else 2)]
    out.check(not wrong, f"{label}: {len(wrong)} killed tasks ran a wrong number of times")
    others = [i for i in ids if i not in killed | lost and len(runs.get(i, [])) != 1]
    out.check(not others, f"{label}: {len(others)} other tasks ran a wrong number of times")
    out.figures[f"{label}_killed"] = len(killed)
    out.figures[f"{label}_lost_in_flight"] = len(lost)
    out.figures[f"{label}_stale"] = len(stale)


def _settled(value: Callable[[], int], quiet: float, timeout: float = 90) -> int | None:
    """``value()`` once it has not changed for ``quiet`` seconds; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return None


# -- 3. sender killed -----------------------------------------------------------------


#: Seconds after which the soak's senders take a killed sender's claims back.
RECLAIM_AFTER = 5.0
RECLAIM_ENV = {"FULLDB_RECLAIM_AFTER": str(RECLAIM_AFTER)}


def sender_killed(ctx: Context) -> Outcome:
    """SIGKILL run_scheduler at random points: every task runs exactly once, with nobody
    resending anything (the senders take a killed one's claims back after RECLAIM_AFTER,
    the worker runs each attempt once however many copies arrive)."""
    out = Outcome("3 sender-kill")
    folder = ctx.folder("sender-kill")
    rows = ctx.sizes.sender_kill_rows
    kills = ctx.sizes.sender_kills
    rng = random.Random(5)
    harness.purge(_app(), ctx.queue)
    ids = [f"sk-{uuid.uuid4()}" for _ in range(rows)]
    start = time.time() + 3
    spread = kills * 1.5  # due rows keep arriving while the senders get killed
    harness.scheduled_rows(ids, ctx.queue, [start + rng.uniform(0, spread) for _ in ids])
    claims_left: list[int] = []
    with harness.stopping_all(ctx):
        harness.start_worker(ctx, "sk-worker", folder, "prefork", 2)
        reclaim = RECLAIM_ENV
        for round_ in range(kills):
            sender = harness.start_sender(
                ctx, f"sender{round_}", folder, "--batch-size=200", **reclaim
            )
            harness.wait_until(lambda s=sender: harness.sender_started(s), 60, 0.05)
            time.sleep(rng.uniform(0.0, 1.2))
            harness.kill(sender)
            claims_left.append(len(harness.stale_scheduled_ids() & set(ids)))
        final = harness.start_sender(ctx, "sender-final", folder, **reclaim)
        stale_now = lambda: harness.stale_scheduled_ids() & set(ids)  # noqa: E731

        def settled() -> bool:
            return harness.count_in(ids, status="SUCCESS") == rows

        out.check(harness.wait_until(settled, 300, 1.0), "rows did not all finish")
        harness.stop(ctx, [final])
        time.sleep(1)
    runs = harness.read_runs(folder)
    stale = stale_now()
    ran = {i for i in ids if runs.get(i)}
    dupes = [i for i in ids if len(runs.get(i, [])) > 1]
    etas = harness.eta_epochs(ids)
    early = [i for i in ran if runs[i][0].at < etas[i]]
    out.check(not dupes, f"{len(dupes)} tasks ran twice {dupes[:3]}")
    out.check(ran == set(ids), f"{len(set(ids) - ran)} tasks never ran")
    out.check(not stale, f"{len(stale)} tasks left for an operator (reported stale)")
    out.check(not early, f"{len(early)} tasks ran before their eta")
    out.figures.update(
        kills=kills,
        kills_leaving_claims=sum(1 for n in claims_left if n),
        reclaimed=harness.reclaimed_in(folder),
        rows=rows,
        ran_once=len(ran),
        reported_stale=len(stale),
        duplicates=len(dupes),
    )
    return out


# -- 4. broker outage -----------------------------------------------------------------


def broker_outage(ctx: Context) -> Outcome:
    """Broker unreachable for a while during publishing and forwarding."""
    out = Outcome("4 broker-down")
    folder = ctx.folder("broker-outage")
    seconds = ctx.sizes.outage_seconds
    _, broker_port = harness.real_ports()
    harness.purge(_app(), ctx.queue)
    ids = [f"bo-{uuid.uuid4()}" for _ in range(ctx.sizes.outage_rows)]
    rng = random.Random(4)
    start = time.time() + 3
    # Due before, during and after the outage.
    harness.scheduled_rows(ids, ctx.queue, [start + rng.uniform(0, seconds + 6) for _ in ids])
    on = {"FULLDB_SCHEDULE_ETA": "1"}
    with FaultProxy(broker_port) as proxy, harness.stopping_all(ctx):
        # A message the broker never confirmed comes back after the lease (RECLAIM_AFTER).
        through = {"FULLDB_BROKER_PORT": str(proxy.port), **on, **RECLAIM_ENV}
        harness.start_worker(ctx, "bo-worker", folder, "prefork", 2, **on)
        sender = harness.start_sender(ctx, "sender", folder, **through)
        rate = 40
        count = int(rate * (seconds + 10))
        # Publishers use broker confirms (README: recommended on RabbitMQ); the sender
        # does not need the setting, the package confirms its own publishes.
        pub, pub_out = harness.start_publisher(
            ctx,
            "pub",
            folder,
            f"--count={count}",
            f"--rate={rate}",
            "--delay-max=5",
            FULLDB_CONFIRM_PUBLISH="1",
            **through,
        )
        harness.wait_until(lambda: harness.sender_started(sender), 60, 0.1)
        time.sleep(3)
        dropped = proxy.outage(seconds)
        try:
            pub.wait(timeout=seconds + 60)
            hung = False
        except Exception:  # noqa: BLE001 - TimeoutExpired: the publisher hangs
            hung = True
        published = harness.read_published(pub_out)
        sched = ids + [r["id"] for r in published if r.get("ok") and r["kind"] != "now"]
        all_ok = ids + [r["id"] for r in published if r.get("ok")]

        def done() -> bool:
            return harness.count_in(all_ok, status__in=FINAL) == len(all_ok)

        out.check(harness.wait_until(done, 120 + seconds, 1.0), "tasks did not finish")
        time.sleep(2)
        sender_log = harness.log_text(sender)
    runs = harness.read_runs(folder)
    out.check(not hung, "the publisher hung")
    errors = [r for r in published if not r.get("ok")]
    slowest = max((r["elapsed"] for r in published), default=0.0)
    out.check(bool(errors), "no publish failed: the outage was not felt")
    out.check(slowest < 20, f"a publish took {slowest:.1f} s")
    unclear = [r["error"] for r in errors if "OperationalError" not in r["error"]]
    out.check(not unclear, f"unclear publish errors: {unclear[:2]}")
    _check_published(out, published, runs, harness.states_of(all_ok))
    lost = [i for i in ids if len(runs.get(i, [])) != 1]
    out.check(not lost, f"{len(lost)} scheduled rows ran a wrong number of times {lost[:3]}")
    left = harness.count_in(sched, status="SCHEDULED")
    out.check(left == 0, f"{left} scheduled tasks still waiting")
    failed_ran = sum(1 for r in errors if runs.get(r["id"]))
    out.figures.update(
        outage_s=seconds,
        connections_reset=dropped,
        publishes=len(published),
        publish_errors=len(errors),
        slowest_publish_s=slowest,
        scheduled=len(sched),
        sched_lost_or_dup=len(lost),
        failed_publish_ran=failed_ran,
        sender_released="released" in sender_log,
    )
    return out


# -- 5. database outage ---------------------------------------------------------------


def database_outage(ctx: Context) -> Outcome:
    """Database unreachable during stores (worker) and forwarding (sender)."""
    out = Outcome("5 db-down")
    folder = ctx.folder("db-outage")
    seconds = ctx.sizes.outage_seconds
    db_port, _ = harness.real_ports()
    harness.purge(_app(), ctx.queue)
    ids = [f"do-{uuid.uuid4()}" for _ in range(ctx.sizes.outage_rows)]
    rng = random.Random(5)
    start = time.time() + 3
    harness.scheduled_rows(ids, ctx.queue, [start + rng.uniform(0, seconds + 6) for _ in ids])
    with FaultProxy(db_port) as proxy, harness.stopping_all(ctx):
        through = {"FULLDB_DB_PORT": str(proxy.port)}
        harness.start_worker(ctx, "do-worker", folder, "prefork", 2, **through)
        sender = harness.start_sender(ctx, "sender", folder, **through, **RECLAIM_ENV)
        rate = 40
        count = int(rate * (seconds + 10))
        # The publisher reaches the database directly: it is the worker and the sender
        # whose database goes away.
        pub, pub_out = harness.start_publisher(
            ctx, "pub", folder, f"--count={count}", f"--rate={rate}", "--no-delayed"
        )
        harness.wait_until(lambda: harness.sender_started(sender), 60, 0.1)
        time.sleep(3)
        dropped = proxy.outage(seconds)
        pub.wait(timeout=seconds + 120)
        published = harness.read_published(pub_out)
        all_ok = ids + [r["id"] for r in published if r.get("ok")]

        def done() -> bool:
            return harness.count_in(all_ok, status__in=FINAL) == len(all_ok)

        out.check(harness.wait_until(done, 180 + seconds, 1.0), "results missing after outage")
        time.sleep(2)
        sender_log = harness.log_text(sender)
        worker_log = "".join(harness.log_text(p) for p in ctx.procs if "worker" in str(p.args))
    runs = harness.read_runs(folder)
    states = harness.states_of(all_ok)
    out.check(all(r.get("ok") for r in published), "publishes failed (direct database)")
    _check_published(out, published, runs, states)
    bad = [i for i in ids if states.get(i) != ("SUCCESS", 0) or len(runs.get(i, [])) != 1]
    stranded = harness.count_in(ids, status="SCHEDULED", scheduled_id__isnull=False)
    out.check(
        not bad,
        f"{len(bad)} scheduled tasks lost, duplicated or wrong ({stranded} still claimed, "
        f"states {Counter(states.get(i, ('none', 0))[0] for i in bad)}) {bad[:3]} "
        f"runs {[len(runs.get(i, [])) for i in bad[:3]]} {harness.why(bad)}",
    )
    errors_seen = "run_scheduler:" in sender_log
    out.check(errors_seen, "the sender saw no database error: the outage was not felt")
    out.figures.update(
        outage_s=seconds,
        connections_reset=dropped,
        results=len(all_ok),
        scheduled=len(ids),
        lost_or_dup=len(bad),
        settled_after_outage="the database is back" in sender_log,
        worker_retried=("Retrying" in worker_log or "retrying" in worker_log),
        sender_resumed=errors_seen and not bad,
    )
    return out


# -- 6. races -------------------------------------------------------------------------


def races(ctx: Context) -> Outcome:
    """Publishes in atomic() finished first by the worker; retries racing their RETRY."""
    from django.db import transaction

    from django_celery_fulldbresult.models import TaskResultMeta
    from testproject.demo.models import Run
    from testproject.demo.tasks import soak_step

    out = Outcome("6 races")
    folder = ctx.folder("races")
    harness.purge(_app(), ctx.queue)
    total = ctx.sizes.race_publishes
    retries = ctx.sizes.race_retries
    ids: list[str] = []
    rollbacks = 0
    with harness.stopping_all(ctx):
        for i in range(2):
            harness.start_worker(ctx, f"race{i}", folder, "prefork", 2)
        retried = soak_step.apply_async(
            kwargs={"fail_times": retries, "retry_countdown": 0, "max_retries": retries},
            queue=ctx.queue,
        )
        batch = 50
        for start in range(0, total, batch):
            try:
                with transaction.atomic():
                    Run.objects.create(task_id=f"caller-{start}", pid=0)  # the caller's work
                    part = [
                        soak_step.apply_async(queue=ctx.queue).id
                        for _ in range(min(batch, total - start))
                    ]
                    ids += part
                    finished = harness.wait_until(
                        lambda p=part: harness.count_in(p, status="SUCCESS") == len(p), 60, 0.05
                    )
                    out.check(finished, "the worker waited for the caller's transaction")
                    if (start // batch) % 2:
                        raise _Rollback
            except _Rollback:
                rollbacks += 1
        retry_done = harness.wait_until(
            lambda: harness.count_in([retried.id], status__in=FINAL) == 1, 120 + retries / 5
        )
        out.check(retry_done, "the retried task did not finish")
        time.sleep(1)
    runs = harness.read_runs(folder)
    states = harness.states_of(ids)
    wrong = [i for i in ids if states.get(i) != ("SUCCESS", 0) or len(runs.get(i, [])) != 1]
    out.check(not wrong, f"{len(wrong)} publishes in atomic() ended wrong {wrong[:3]}")
    late_pending = TaskResultMeta.objects.filter(
        task_id__in=ids, date_submitted__gt=_done_field()
    ).count()
    row = TaskResultMeta.objects.get(task_id=retried.id)
    attempts = Counter(e.attempt for e in runs.get(retried.id, []))
    out.check(
        (row.status, row.retries) == ("SUCCESS", retries),
        f"retried task ended {row.status} retries={row.retries}, expected SUCCESS {retries}",
    )
    out.check(
        sorted(attempts) == list(range(retries + 1)) and set(attempts.values()) == {1},
        f"attempts not each run once: {len(attempts)} distinct, max {max(attempts.values())}",
    )
    out.figures.update(
        atomic_publishes=len(ids),
        rolled_back_batches=rollbacks,
        publish_row_after_success=late_pending,
        retries=row.retries,
        retry_status=row.status,
    )
    return out


class _Rollback(Exception):
    pass


def _done_field() -> Any:
    from django.db.models import F

    return F("date_done")


# -- 7. bad input ---------------------------------------------------------------------


def bad_input(ctx: Context) -> Outcome:
    from . import badinput

    return badinput.run(ctx)


# -- 8. run once -----------------------------------------------------------------------


def run_once(ctx: Context) -> Outcome:
    """RUN_ONCE: copies of a message arrive, each attempt runs once.

    Every stack: each of ``run_once_tasks`` tasks is published twice with the same id (a
    publish retried after a lost answer). Redis only (``visibility_timeout`` 3 s): long
    ``acks_late`` tasks (6 s) and tasks held for a broker ETA 8 s ahead are handed out again
    while the first worker still has them (kombu#337). Two workers; a task may run only once,
    and the workers' logs must show the copies they refused.
    """
    from testproject.demo.tasks import soak_step

    out = Outcome("8 run-once")
    folder = ctx.folder("run-once")
    app = _app()
    harness.purge(app, ctx.queue)
    redis = ctx.stack == "maria-redis"
    env = {
        "FULLDB_RUN_ONCE": "1",
        "FULLDB_ACKS_LATE": "1",
        "FULLDB_PREFETCH": "1",
        "FULLDB_HEARTBEAT": "1",
        "FULLDB_VISIBILITY_TIMEOUT": "3",
        "FULLDB_LOGLEVEL": "INFO",  # the copies a worker refuses are logged at INFO
    }
    count = ctx.sizes.run_once_tasks
    with harness.stopping_all(ctx):
        workers = [
            harness.start_worker(ctx, f"once{n}", folder, "prefork", 2, **env) for n in (1, 2)
        ]
        twice = [str(uuid.uuid4()) for _ in range(count)]
        for task_id in twice:
            for _ in range(2):
                soak_step.apply_async(task_id=task_id, queue=ctx.queue)
        long_ids: list[str] = []
        eta_ids: list[str] = []
        if redis:
            long_ids = [
                soak_step.apply_async(kwargs={"pause": 6.0}, queue=ctx.queue).id
                for _ in range(ctx.sizes.run_once_long_tasks)
            ]
            eta_ids = [
                soak_step.apply_async(countdown=8, queue=ctx.queue).id for _ in range(count // 4)
            ]
        ids = twice + long_ids + eta_ids
        done = harness.wait_until(lambda: harness.count_in(ids, status="SUCCESS") == len(ids), 180)
        out.check(done, "tasks did not all finish")
        # Copies keep coming back for a visibility timeout after the last task finished.
        time.sleep(8 if redis else 2)
        refused = sum(harness.log_text(w).count("run once:") for w in workers)
    runs = harness.read_runs(folder)
    wrong = [i for i in ids if len(runs.get(i, [])) != 1]
    out.check(not wrong, f"{len(wrong)} tasks did not run exactly once {wrong[:3]}")
    out.check(refused >= count, f"the workers refused {refused} copies, fewer than {count}")
    out.figures.update(
        tasks=len(ids),
        published_twice=count,
        redelivered_long=len(long_ids),
        redelivered_eta=len(eta_ids),
        copies_refused=refused,
        ran_once=sum(1 for i in ids if len(runs.get(i, [])) == 1),
        duplicates=sum(1 for i in ids if len(runs.get(i, [])) > 1),
    )
    return out


# -- 9. worker killed, recovered by policy --------------------------------------------

#: Seconds after which the soak's senders recover a dead worker's tasks (RECOVER_AFTER).
RECOVER_AFTER = 3.0
#: Redis's visibility timeout in scenario 9 (seconds): the victim's unacked messages come
#: back to the rescuer after it (restored every second, see testproject.settings).
RECOVERY_VISIBILITY = 6
#: What a policy makes of a task that was running when its worker was killed.
KILLED_END = {"resend": "SUCCESS", "fail": "FAILURE", "report": "STARTED"}
_RECOVERY_LINE = re.compile(r"(resent|failed|reported|not replayable|moved on) \d+ \[([^\]]*)\]")


def worker_kill_recovery(ctx: Context) -> Outcome:
    """SIGKILL a ``RUN_ONCE`` worker mid-task under each recovery policy (resend, fail,
    report): a running sender recovers the dead worker's tasks by itself, and each task
    ends as its policy says, run no more often than that."""
    out = Outcome("9 kill-recovery")
    for policy in ctx.sizes.recovery_policies:
        _recovery_case(ctx, out, policy)
    return out


def _recovered_ids(log: str) -> dict[str, set[str]]:
    """outcome -> task ids, from the sender's recovery log lines (``recover_stale``)."""
    found: dict[str, set[str]] = {}
    for line in log.splitlines():
        if "stale tasks of lost workers" in line:
            for outcome, ids in _RECOVERY_LINE.findall(line):
                found.setdefault(outcome, set()).update(i for i in ids.split(", ") if i)
    return found


def _recovery_case(ctx: Context, out: Outcome, policy: str) -> None:
    from django.utils import timezone

    from django_celery_fulldbresult.models import TaskResultMeta
    from testproject.demo.tasks import soak_step

    folder = ctx.folder(f"kill-recovery-{policy}")
    # A queue per case (see _worker_kill_case): the victim's messages stay in this case.
    ctx = dataclasses.replace(ctx, queue=f"{ctx.queue}-recover-{policy}")
    app = _app()
    harness.purge(app, ctx.queue)
    env = {
        "FULLDB_RUN_ONCE": "1",
        "FULLDB_ACKS_LATE": "0",
        "FULLDB_PREFETCH": "1",
        "FULLDB_HEARTBEAT": "1",
        "FULLDB_VISIBILITY_TIMEOUT": str(RECOVERY_VISIBILITY),  # Redis: unacked ones come back
        "FULLDB_LOGLEVEL": "INFO",  # copies refused, recovery passes that only report
    }
    count = ctx.sizes.recovery_kill_tasks
    redis = ctx.stack == "maria-redis"
    in_flight = 1 if redis else 0  # messages the kill may take unreceived (_lost_in_flight)
    with harness.stopping_all(ctx):
        victim = harness.start_worker(ctx, f"victim-{policy}", folder, "prefork", 2, **env)
        ids = [
            soak_step.apply_async(kwargs={"pause": 0.6}, queue=ctx.queue).id for _ in range(count)
        ]

        def mid_task() -> bool:
            # Started in the last 0.3 s of its 0.6 s: still running when the kill lands.
            recent = timezone.now() - timedelta(seconds=0.3)
            return harness.count_in(ids, status="SUCCESS") >= 1 and bool(
                harness.count_in(ids, status="STARTED", date_started__gte=recent)
            )

        out.check(harness.wait_until(mid_task, 60, 0.05), f"{policy}: no task started")
        harness.kill(victim)
        harness.group_gone(victim)
        at_kill = harness.states_of(ids)
        killed = {i for i, (s, _) in at_kill.items() if s == "STARTED"}
        received = {i for i, (s, _) in at_kill.items() if s == "RECEIVED"}
        harness.start_worker(ctx, f"rescuer-{policy}", folder, "prefork", 2, **env)
        # By then Redis has given the rescuer back every message the victim held unacked:
        # a task still PENDING after that was lost in flight (see _lost_in_flight).
        back_by = time.monotonic() + RECOVERY_VISIBILITY + 10
        sender = harness.start_sender(
            ctx,
            f"sender-{policy}",
            folder,
            FULLDB_RECOVER=policy,
            FULLDB_RECOVER_AFTER=str(RECOVER_AFTER),
            FULLDB_HEARTBEAT="1",
            FULLDB_LOGLEVEL="INFO",
        )
        # A killed task ends as its policy says, or SUCCESS when the broker gave it back
        # (its early ack died with the connection); every other task ends SUCCESS.
        ends = {i: {KILLED_END[policy], "SUCCESS"} if i in killed else {"SUCCESS"} for i in ids}

        def ended() -> bool:
            states = harness.states_of(ids)
            open_ = [i for i in ids if states.get(i, ("?", 0))[0] not in ends[i]]
            return not open_ or (
                time.monotonic() > back_by
                and len(open_) <= in_flight
                and all(states.get(i, ("?", 0))[0] == "PENDING" for i in open_)
            )

        out.check(harness.wait_until(ended, 60, 0.5), f"{policy}: tasks did not end in time")

        def moves() -> int:  # any change of a state or a new run
            states = Counter(s for s, _ in harness.states_of(ids).values())
            runs = sum(len(v) for v in harness.read_runs(folder).values())
            return hash((tuple(sorted(states.items())), runs))

        # Copies keep arriving for Redis's visibility timeout (6 s); the victim's heartbeat
        # has long expired by then (1 s x 3), so find_stale_tasks may judge its rows.
        quiet = _settled(moves, quiet=8 if redis else 4, timeout=60)
        out.check(quiet is not None, f"{policy}: tasks kept changing for 60 s")
        stale = harness.stale_task_ids() & set(ids)
        sender_log = harness.log_text(sender)
        worker_log = "".join(harness.log_text(p) for p in ctx.procs if "worker" in str(p.args))
    states = harness.states_of(ids)
    runs = harness.read_runs(folder)
    n = {i: len(runs.get(i, [])) for i in ids}
    recovered = _recovered_ids(sender_log)
    resent = recovered.get("resent", set()) & set(ids)
    failed = recovered.get("failed", set()) & set(ids)
    reported = recovered.get("reported", set()) & set(ids)
    status = {i: states.get(i, ("missing", 0))[0] for i in ids}
    # Given back by the broker and run by the rescuer, not by the policy (RabbitMQ).
    redelivered = {i for i in killed if status[i] == "SUCCESS" and i not in resent}
    by_policy = killed - redelivered
    out.check(bool(killed), f"{policy}: the kill hit no running task")
    lost = _lost_in_flight(ids, status, n)
    out.check(
        len(lost) <= in_flight,
        f"{policy}: {len(lost)} tasks lost (never ran) {harness.why(sorted(lost))}",
    )
    wrong_state = [f"{i}:{status[i]}" for i in ids if status[i] not in ends[i] and i not in lost]
    out.check(not wrong_state, f"{policy}: wrong final state {len(wrong_state)} {wrong_state[:3]}")
    # A killed task ran once before the kill (none if it died between its STARTED write and
    # its first line), once more if resent or redelivered; every other task exactly once.
    allowed = {i: 1 for i in ids}
    for i in killed:
        allowed[i] = 2 if status[i] == "SUCCESS" else 1
    too_many = [f"{i}:{n[i]}" for i in ids if n[i] > allowed[i]]
    out.check(not too_many, f"{policy}: tasks ran too often {len(too_many)} {too_many[:3]}")
    never = [i for i in ids if status[i] == "SUCCESS" and not n[i]]
    out.check(not never, f"{policy}: {len(never)} SUCCESS tasks never ran")
    unkilled_twice = [i for i in ids if i not in killed | lost and n[i] != 1]
    out.check(not unkilled_twice, f"{policy}: {len(unkilled_twice)} other tasks ran != once")
    # The receipt claim must have judged every message (it runs a task unchecked when it
    # cannot), and every task must stay replayable: it was published with its arguments.
    unchecked = worker_log.count("run once: could not take")
    errors = sorted({e[:150] for e in re.findall(r"^[\w.]+Error: .*$", worker_log, re.M)})
    out.check(not unchecked, f"{policy}: {unchecked} receipts failed, run unchecked {errors[:2]}")
    not_replayable = recovered.get("not replayable", set()) & set(ids)
    out.check(not not_replayable, f"{policy}: {len(not_replayable)} tasks not replayable")
    # The victim's received-but-not-started tasks: run by the rescuer, whatever the policy.
    out.check(not resent - killed - received, f"{policy}: resent tasks it did not hold")
    if policy == "resend":
        out.check(by_policy <= resent, f"{policy}: killed tasks not resent {by_policy - resent}")
        out.check(stale == lost, f"{policy}: find_stale_tasks reports {stale}, {lost}")
    elif policy == "fail":
        out.check(failed == by_policy, f"{policy}: failed {failed}, killed {by_policy}")
        out.check(not resent & killed, f"{policy}: killed tasks resent {resent & killed}")
        rows = TaskResultMeta.objects.filter(task_id__in=list(by_policy))
        not_lost = [
            task_id
            for task_id, traceback in rows.values_list("task_id", "traceback")
            if "worker lost" not in (traceback or "")
            or not isinstance(app.AsyncResult(task_id).result, WorkerLostError)
        ]
        out.check(not not_lost, f"{policy}: no WorkerLostError in {not_lost[:3]}")
        out.check(stale == lost, f"{policy}: find_stale_tasks reports {stale}, {lost}")
    else:
        reportable = by_policy | lost
        out.check(stale == reportable, f"{policy}: find_stale_tasks reports {stale}, {reportable}")
        out.check(by_policy <= reported, f"{policy}: not reported {by_policy - reported}")
        out.check(not resent & killed, f"{policy}: killed tasks resent {resent & killed}")
    out.figures[f"{policy}_killed"] = len(killed)
    out.figures[f"{policy}_received"] = len(received)
    out.figures[f"{policy}_received_resent"] = len(resent & received)
    out.figures[f"{policy}_resent"] = len(resent)
    out.figures[f"{policy}_failed"] = len(failed)
    out.figures[f"{policy}_reported"] = len(reported)
    out.figures[f"{policy}_stale"] = len(stale)
    if redelivered:
        out.figures[f"{policy}_redelivered"] = len(redelivered)
    if lost:
        out.figures[f"{policy}_lost_in_flight"] = len(lost)


def _lost_in_flight(ids: list[str], status: dict[str, str], runs: dict[str, int]) -> set[str]:
    """The tasks no worker ever received: still PENDING from publish tracking, never run.
    ``find_stale_tasks`` must report them, as it reports the other unfinished ones.

    On Redis a SIGKILL may take one: the message the victim's ``BRPOP`` had popped and kombu
    had not yet written to its unacked hash (the transport has no atomic move: docs/design.md,
    "Not the package's, but seen"). Under RUN_ONCE every message a worker did receive was
    taken first (RECEIVED, with its hostname): recovery or the broker covers those, and
    RabbitMQ gives back whatever was unacknowledged, so on RabbitMQ none may be lost."""
    return {i for i in ids if status[i] == "PENDING" and not runs[i]}


SCENARIOS = {
    "1": load,
    "2": worker_killed,
    "3": sender_killed,
    "4": broker_outage,
    "5": database_outage,
    "6": races,
    "7": bad_input,
    "8": run_once,
    "9": worker_kill_recovery,
}


def run_scenario(key: str, ctx: Context) -> Outcome:
    """Run one scenario; an exception is a FAIL with its message, never a crash of the run."""
    started = time.monotonic()
    try:
        outcome = SCENARIOS[key](ctx)
    except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
        import traceback

        outcome = Outcome(SCENARIOS[key].__name__)
        outcome.problems.append(f"crashed: {exc!r}")
        (ctx.work_dir / f"scenario{key}-traceback.txt").write_text(traceback.format_exc())
    finally:
        harness.stop(ctx)
    outcome.seconds = time.monotonic() - started
    return outcome
