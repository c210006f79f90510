"""The seven soak and fault scenarios (issue 5). Each returns an :class:`Outcome`.

Every scenario starts real processes (``celery worker``, ``manage.py
run_scheduler``, publisher processes) on the context's database and queue,
does its damage, then checks task by task, from the task table and from the
workers' run log (see ``soak_step``), that nothing was lost, duplicated or
misreported.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

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


def sender_killed(ctx: Context) -> Outcome:
    """SIGKILL run_scheduler at random points; no duplicates, the rest reported."""
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
        for round_ in range(kills):
            sender = harness.start_sender(ctx, f"sender{round_}", folder, "--batch-size=200")
            harness.wait_until(lambda s=sender: harness.sender_started(s), 60, 0.05)
            time.sleep(rng.uniform(0.0, 1.2))
            harness.kill(sender)
            claims_left.append(len(harness.stale_scheduled_ids() & set(ids)))
        final = harness.start_sender(ctx, "sender-final", folder)
        stale_now = lambda: harness.stale_scheduled_ids() & set(ids)  # noqa: E731

        def settled() -> bool:
            return harness.count_in(ids, status="SUCCESS") + len(stale_now()) == rows

        out.check(harness.wait_until(settled, 300, 1.0), "rows neither finished nor reported")
        harness.stop(ctx, [final])
        time.sleep(1)
    runs = harness.read_runs(folder)
    stale = stale_now()
    ran = {i for i in ids if runs.get(i)}
    dupes = [i for i in ids if len(runs.get(i, [])) > 1]
    etas = harness.eta_epochs(ids)
    early = [i for i in ran if runs[i][0].at < etas[i]]
    out.check(not dupes, f"{len(dupes)} tasks ran twice {dupes[:3]}")
    out.check(ran | stale == set(ids), f"{len(set(ids) - ran - stale)} tasks lost")
    out.check(not ran & stale, f"{len(ran & stale)} tasks ran but are reported stale")
    out.check(not early, f"{len(early)} tasks ran before their eta")
    out.figures.update(
        kills=kills,
        kills_leaving_claims=sum(1 for n in claims_left if n),
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
        through = {"FULLDB_BROKER_PORT": str(proxy.port), **on}
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
        sender = harness.start_sender(ctx, "sender", folder, **through)
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


SCENARIOS = {
    "1": load,
    "2": worker_killed,
    "3": sender_killed,
    "4": broker_outage,
    "5": database_outage,
    "6": races,
    "7": bad_input,
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
