"""Run every benchmark and write the summary to bench/results/latest.md (and, for a full
run, to BENCHMARKS.md at the top of the repository: ``make bench``).

    python bench/run.py            # stores, e2e, stale_plan, scheduler, stats_bench, admin,
                                   # chord_bench, publish_bench, wait_bench
    python bench/run.py --quick    # smaller counts, a smoke test (about 3.5 min)
    python bench/run.py --only stores,e2e

Each benchmark runs in its own process (they use different databases and
settings) with a time limit; the runs are isolated from the tests and the demo
(database ``fulldb_bench``/``fulldb_bench_stale``, queue ``bench``, var dir
``/tmp/fulldb-bench``; scheduler.py: ``fulldb_bench_sched``, ``bench_sched``,
``/tmp/fulldb-bench-sched``; admin.py: ``fulldb_bench_admin``, ``bench_admin``,
``/tmp/fulldb-bench-admin``; chord_bench.py: ``fulldb_bench_chords``, ``bench_chords``,
``/tmp/fulldb-bench-chords``; publish_bench.py: ``fulldb_bench_publish``,
``bench_publish``, ``/tmp/fulldb-bench-publish``; wait_bench.py: ``fulldb_bench_wait``,
``bench_wait``, ``/tmp/fulldb-bench-wait``, Redis database 11). PostgreSQL and RabbitMQ on
127.0.0.1 must be up, and Redis for wait_bench.py (``bash scripts/services.sh`` starts them;
this script tries it once).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

_common.reexec_in_venv()

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

#: name -> (script, arguments, time limit in seconds, quick arguments). The limits leave room
#: for a machine 3x slower than the one BENCHMARKS.md was measured on (stores hit 300 s).
BENCHMARKS = {
    "stores": ("stores.py", [], 900, ["--tasks", "500", "--repeat", "1", "--warmup", "50"]),
    "e2e": ("e2e.py", [], 1200, ["--tasks", "300", "--rounds", "1"]),
    "stale": ("stale_plan.py", [], 300, ["--repeat", "3"]),
    "scheduler": ("scheduler.py", [], 900, ["--quick"]),
    "stats": ("stats_bench.py", [], 300, ["--repeat", "3"]),
    "admin": ("admin.py", [], 420, ["--repeat", "3", "--no-dcr"]),
    "chords": ("chord_bench.py", [], 600, ["--quick"]),
    "publish": ("publish_bench.py", [], 900, ["--rounds", "2"]),
    "wait": ("wait_bench.py", [], 720, ["--quick"]),
}
#: Benchmarks that keep 1M rows across runs; --refill rebuilds them.
REFILLABLE = ("stale", "scheduler", "stats", "admin")


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return True
    except OSError:
        return False


def ensure_services(names: list[str]) -> None:
    services = [("pg", 5432), ("rabbit", 5672)]
    if "wait" in names:
        services.append(("redis", 6379))  # wait_bench.py's anchor: Celery's Redis backend
    for name, port in services:
        if not reachable(port):
            print(f"{name} is down on 127.0.0.1:{port}; trying scripts/services.sh {name}")
            subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), name], timeout=120)
        if not reachable(port):
            raise SystemExit(f"{name} is not reachable on 127.0.0.1:{port}")


def run_one(name: str, quick: bool, extra: list[str]) -> dict:
    script, args, limit, quick_args = BENCHMARKS[name]
    out_json = Path(_common.VAR_DIR) / f"{name}.json"
    out_json.unlink(missing_ok=True)
    log = Path(_common.VAR_DIR) / f"{name}.out"
    command = [
        sys.executable,
        str(BENCH / script),
        *args,
        *(quick_args if quick else []),
        *extra,
        "--json-out",
        str(out_json),
    ]
    print(f"[run] {name}: {shlex.join(command[1:])} (limit {limit} s, output {log})", flush=True)
    started = time.monotonic()
    with log.open("w") as stdout:
        proc = subprocess.Popen(command, cwd=REPO, stdout=stdout, env=_common.bench_env())
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"[run] {name}: over {limit} s, stopping it", flush=True)
            code = _stop(proc)
        except KeyboardInterrupt:
            # The child got the same SIGINT and cleans up (stops its worker).
            _stop(proc, signal.SIGINT)
            raise
    seconds = time.monotonic() - started
    if code != 0 or not out_json.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        print(f"[run] {name}: FAILED (exit {code}) after {seconds:.0f} s\n{tail}", flush=True)
        return {"name": name, "failed": True, "exit_code": code, "seconds": seconds}
    print(f"[run] {name}: done in {seconds:.0f} s", flush=True)
    result = json.loads(out_json.read_text())
    result["seconds"] = seconds
    return result


def _stop(proc: subprocess.Popen, first: int = signal.SIGTERM) -> int:
    """Ask the child to stop (it stops its worker in ``finally``); kill it if it hangs."""
    try:
        if proc.poll() is None and first != signal.SIGINT:
            proc.send_signal(first)
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- summary ------------------------------------------------------------------


def anchored(measure: str, ours: float, anchor: float) -> list:
    """A summary row measured against its own anchor (ratio ours / anchor)."""
    return [measure, ours, anchor, f"**{ours / anchor:.2f}x**"]


def headline(results: dict[str, dict]) -> str:
    rows = []
    stores = results.get("stores")
    if stores and not stores.get("failed"):
        raw = stores["sections"][0]["raw"]
        for label in ("first write (STARTED)", "later write (SUCCESS)"):
            ours = raw[f"ours/{label}"]
            dcr = raw[f"django-celery-results/{label}"]
            rows.append(
                [
                    f"SQL statements per {label}",
                    str(ours["statements"]),
                    str(dcr["statements"]),
                    "",
                ]
            )
            sent = ours["wire"].get("bytes_sent"), dcr["wire"].get("bytes_sent")
            if None not in sent:
                rows.append([f"bytes sent per {label}", f"{sent[0]:,}", f"{sent[1]:,}", ""])
        summary = stores["sections"][1]["summary"]
        ours, dcr = summary["ours"], summary["django-celery-results"]
        floor = summary["floor (raw upsert)"]
        rows.append(
            [
                "backend writes/s (3 per task, in process)",
                ours["writes_per_s"],
                dcr["writes_per_s"],
                f"**{ours['writes_per_s'] / dcr['writes_per_s']:.2f}x**",
            ]
        )
        rows.append(
            [
                "write latency p50 / p99 ms",
                f"{ours['p50_ms']:.3f} / {ours['p99_ms']:.3f}",
                f"{dcr['p50_ms']:.3f} / {dcr['p99_ms']:.3f}",
                "",
            ]
        )
        rows.append(
            [
                "backend writes/s (anchor: the floor, a raw 1-statement upsert of a 2-column "
                "row; goal >= 0.6)",
                ours["writes_per_s"],
                f"{floor['writes_per_s']:,.0f} (p50 {floor['p50_ms']:.3f} ms)",
                f"**{ours['writes_per_s'] / floor['writes_per_s']:.2f}x**",
            ]
        )
    e2e = results.get("e2e")
    if e2e and not e2e.get("failed"):
        by_key = {
            (c["backend"], c["reuse_max"]): c
            for c in e2e["configs"]
            if c.get("track_publish", True) and not c.get("run_once") and not c.get("django_task")
        }
        for reuse, label in (
            ("", "Celery default (close per task)"),
            ("1000", "DB_REUSE_MAX=1000"),
        ):
            ours = by_key.get(("ours", reuse))
            dcr = by_key.get(("django-celery-results", reuse))
            if ours and dcr:
                rows.append(
                    [
                        f"end-to-end tasks/s, {label}",
                        ours["tasks_per_s"],
                        dcr["tasks_per_s"],
                        f"**{ours['tasks_per_s'] / dcr['tasks_per_s']:.2f}x**",
                    ]
                )
        checked = next((c for c in e2e["configs"] if c.get("run_once")), None)
        plain = by_key.get(("ours", "1000"))
        if checked and plain:
            rows.append(
                anchored(
                    "end-to-end tasks/s, DB_REUSE_MAX=1000, RUN_ONCE (anchor: ours without it)",
                    checked["tasks_per_s"],
                    plain["tasks_per_s"],
                )
            )
        ceiling = next((c for c in e2e["configs"] if c.get("ignore_result")), None)
        if ceiling and plain:
            rows.append(
                anchored(
                    "end-to-end tasks/s, DB_REUSE_MAX=1000 (anchor: the same worker with "
                    "ignore_result=True, nothing stored: the ceiling; goal >= 0.9)",
                    plain["tasks_per_s"],
                    ceiling["tasks_per_s"],
                )
            )
        for slug, label in (
            (
                "ours-reuse1000-untracked-nostarted",
                "ours storing only the final state (one "
                "write per task: publish tracking and track_started off)",
            ),
            (
                "redis-reuse1000-untracked-nostarted",
                "Celery's Redis result backend in the worker, one write per task",
            ),
        ):
            other = next((c for c in e2e["configs"] if c["slug"] == slug), None)
            if other and ceiling:
                rows.append(
                    anchored(
                        f"end-to-end tasks/s, DB_REUSE_MAX=1000, {label} (anchor: the ceiling)",
                        other["tasks_per_s"],
                        ceiling["tasks_per_s"],
                    )
                )
        django_task = next((c for c in e2e["configs"] if c.get("django_task")), None)
        if django_task and plain:
            rows.append(
                anchored(
                    "end-to-end tasks/s, DB_REUSE_MAX=1000, Django @task enqueue (anchor: the "
                    "plain Celery task, same configuration)",
                    django_task["tasks_per_s"],
                    plain["tasks_per_s"],
                )
            )
    stale = results.get("stale")
    if stale and not stale.get("failed"):
        case = stale["cases"][0]
        rows.append(
            [
                f"stale query on {sum(stale['facts']['states'].values()):,} rows: execution ms "
                f"({case['rows']:,} stale rows)",
                f"{case['execution_ms']:.1f} ({'<' if stale['target_met'] else '>='} "
                f"{stale['target_ms']:.0f} target)",
                "",
                "",
            ]
        )
        rows.append(
            [
                "stale query: index used / seq scan on task table",
                f"{', '.join(case['indexes']) or 'none'} / "
                f"{'yes' if case['seq_scan_on_task_table'] else 'no'}",
                "",
                "",
            ]
        )
        rows.append(
            [
                "stale: list(qs) ms / find_stale_tasks --json ms",
                f"{stale['list_ms']:.0f} / {stale['command_ms']:.0f}",
                "",
                "",
            ]
        )
    scheduler = results.get("scheduler")
    if scheduler and not scheduler.get("failed"):
        rows.extend(scheduler_rows(scheduler))
    stats = results.get("stats")
    if stats and not stats.get("failed"):
        case = stats["cases"][0]
        rows.append(
            [
                f"stats(24 h) ms / stats(1 h) ms / dashboard ms, {stats['fill']['rows']:,} rows "
                "(baseline: stats(24 h, exact=True), every row of the window)",
                f"{case['day']['wall_ms']:.0f} / {case['hour']['wall_ms']:.0f} / "
                f"{case['dashboard']['ms']:.0f} (< 100 / - / 150 target)",
                f"{case['exact']['wall_ms']:.0f}",
                f"**{case['day']['wall_ms'] / case['exact']['wall_ms']:.2f}x**",
            ]
        )
        rows.append(
            [
                "stats(24 h) ms, first call with no hour sealed (counts 22-23 hours once)",
                f"{case['first']['wall_ms']:.0f}",
                "",
                "",
            ]
        )
    admin = results.get("admin")
    if admin and not admin.get("failed"):
        rows.extend(admin_rows(admin))
    chords = results.get("chords")
    if chords and not chords.get("failed"):
        rows.extend(chord_rows(chords))
    publish = results.get("publish")
    if publish and not publish.get("failed"):
        rows.append(
            [
                "publish tracking: ms per apply_async, tracked / plain (added)",
                f"{publish['tracked_ms']:.3f} ({publish['added_ms']:+.3f})",
                f"{publish['plain_ms']:.3f}",
                f"{publish['plain_ms'] / publish['tracked_ms']:.2f}x",
            ]
        )
        if "transactional_ms" in publish:
            rows.append(
                [
                    "transactional publish: ms per apply_async, one call per atomic() / 100 "
                    "calls per atomic() (vs plain in atomic())",
                    f"{publish['transactional_ms']:.3f} / {publish['transactional_x100_ms']:.3f}",
                    f"{publish['plain_atomic_ms']:.3f}",
                    f"{publish['plain_atomic_ms'] / publish['transactional_ms']:.2f}x",
                ]
            )
        if "django_enqueue_ms" in publish:
            rows.append(
                [
                    "Django @task: ms per enqueue, its row written before it returns (vs plain "
                    "apply_async; added)",
                    f"{publish['django_enqueue_ms']:.3f} ({publish['django_added_ms']:+.3f})"
                    + ("" if publish["django_ok"] else " (rows: **NOT** one per enqueue)"),
                    f"{publish['plain_ms']:.3f}",
                    f"{publish['plain_ms'] / publish['django_enqueue_ms']:.2f}x",
                ]
            )
    wait = results.get("wait")
    if wait and not wait.get("failed"):
        rows.extend(wait_rows(wait))
    failed = [name for name, r in results.items() if r.get("failed")]
    text = (
        "Baseline: django-celery-results for the result backend rows; Celery without the "
        "scheduler (native broker ETA, plain `apply_async`) for the `scheduler:` rows, plain "
        "`apply_async` (tracking off, same process) for the `publish tracking` and `Django @task: "
        "ms per enqueue` rows, the plain Celery task `add` in the same configuration for the "
        "end-to-end Django @task row, "
        "ours with `RESULT_PUSH = False` (polling) or Celery's Redis result backend for the "
        "`wait:` rows; rows that name another anchor (the raw-upsert floor, the "
        "`ignore_result` ceiling, ours without `RUN_ONCE`) are measured against it. "
        "The ratio of the chord row, of the `ms per` rows and of the `wait:` lag and statement "
        "rows is the baseline's time (or count) over ours (higher is better for us).\n\n"
    )
    text += _common.table(["measure", "ours", "baseline", "ours / baseline"], rows)
    if failed:
        text += f"\n\n**FAILED:** {', '.join(failed)} (see /tmp/fulldb-bench/<name>.out)"
    return text


def scheduler_rows(result: dict) -> list[list[str]]:
    """The summary rows of scheduler.py (whichever of its parts ran)."""
    rows = []
    mib = 2**20
    memory = result.get("memory")
    if memory:
        native, ours = memory["native"], memory["scheduler"]

        def rss(r: dict) -> str:
            return (
                f"{r['rss_before'] / mib:.0f} -> {r['rss_after'] / mib:.0f} "
                f"({r['bytes_per_task']:+,.0f} B/task)"
            )

        rows.append(
            [
                f"scheduler: worker RSS MiB, idle -> {native['tasks']:,} countdown=3600 tasks "
                "(baseline: native ETA in the worker)",
                rss(ours),
                rss(native),
                f"**{ours['rss_after'] / native['rss_after']:.2f}x**",
            ]
        )
    forward = result.get("forward")
    if forward:
        rows.append(
            [
                f"scheduler: forwarding tasks/s, {forward['count']:,} due rows, one process "
                "(baseline: plain apply_async with confirms on, `confirm_publish`)",
                forward["forward_per_s"],
                forward["confirmed_per_s"],
                f"**{forward['forward_per_s'] / forward['confirmed_per_s']:.2f}x**",
            ]
        )
        rows.append(
            [
                "scheduler: forwarding tasks/s, the same (baseline: plain apply_async without "
                "confirms)",
                forward["forward_per_s"],
                forward["plain_per_s"],
                f"{forward['forward_per_s'] / forward['plain_per_s']:.2f}x",
            ]
        )
        reread = [c for c in forward["statement_costs"] if c["label"].startswith("claim: re-read")]
        if reread:
            c = reread[0]
            seq = "**yes**" if c["seq_scan_on_task_table"] else "no"
            rows.append(
                [
                    f"scheduler: claim re-read of the claimed rows at {forward['table_rows']:,} "
                    f"rows, ms per batch of {forward['batch']}",
                    f"{c['ms_per_call']:.0f} (seq scan: {seq})",
                    "",
                    "",
                ]
            )
    lateness = result.get("lateness")
    if lateness:
        lo, hi = lateness["spread"]
        for label, key in (
            ("sender published - eta", "publish_lateness_ms"),
            ("worker started - eta", "started_lateness_ms"),
        ):
            st = lateness[key]
            rows.append(
                [
                    f"scheduler: lateness p50 / p95 / p99 / max ms, {label} "
                    f"({lateness['count']:,} tasks over {lo:g}-{hi:g} s, run_scheduler)",
                    f"{st['p50']:.0f} / {st['p95']:.0f} / {st['p99']:.0f} / {st['max']:.0f}",
                    "",
                    "",
                ]
            )
        p99 = lateness["started_lateness_ms"]["p99"]
        rows[-1][1] += f" ({'<' if p99 < 1000 else '>='} 1000 target)"
        rows.append(
            [
                "scheduler: ran exactly once (row SUCCESS, one publish, one execution)",
                f"{lateness['exactly_once']:,} / {lateness['count']:,}",
                "",
                "",
            ]
        )
    empty = result.get("empty")
    if empty:
        rows.append(
            [
                f"scheduler: empty pass at {empty['rows']:,} rows not due: wall ms / DB "
                "execution ms",
                f"{empty['pass_ms_median']:.2f} / {empty['execution_ms_total']:.3f} "
                f"({'<' if empty['target_met'] else '>='} 1 target)",
                "",
                "",
            ]
        )
        rows.append(
            [
                "scheduler: empty pass index used / seq scan on task table",
                f"{', '.join(empty['indexes']) or 'none'} / {'yes' if empty['seq_scan'] else 'no'}",
                "",
                "",
            ]
        )
    return rows


def admin_rows(result: dict) -> list[list[str]]:
    """The summary rows of admin.py: ours next to django-celery-results' admin."""
    rows = []
    pages = {(p["kind"], p["label"]): p for p in result["pages"]}
    pairs = (
        ("changelist", "default (newest first)", "dcr changelist", "default"),
        ("changelist", "state = FAILURE", "dcr changelist", "state = FAILURE"),
        ("search", "exact task id", "dcr search", "exact task id"),
    )
    total = result["fill"]["rows"]
    for kind, label, dcr_kind, dcr_label in pairs:
        ours, dcr = pages.get((kind, label)), pages.get((dcr_kind, dcr_label))
        if ours is None:
            continue
        rows.append(
            [
                f"admin at {total:,} rows: {kind} {label}, ms (baseline: django-celery-results)",
                f"{ours['median_ms']:.0f}",
                f"{dcr['median_ms']:.0f}" if dcr else "",
                f"**{ours['median_ms'] / dcr['median_ms']:.2f}x**" if dcr else "",
            ]
        )
    slowest = max(
        (p for p in result["pages"] if not p["kind"].startswith("dcr")),
        key=lambda p: p["median_ms"],
    )
    rows.append(
        [
            "admin: slowest of our pages (changelists, filters, searches), ms",
            f"{slowest['median_ms']:.0f} ({slowest['kind']}: {slowest['label']})",
            "",
            "",
        ]
    )
    retry = result["retry"]
    rows.append(
        [
            f"admin: Retry action on {retry['rows']:,} selected rows, s (target < 10)",
            f"{retry['retry_s']:.2f}",
            "",
            "",
        ]
    )
    return rows


def chord_rows(result: dict) -> list[list[str]]:
    """The summary row of chord_bench.py: seconds until a chord's body result."""
    backends = result["backends"]
    ours, dcr = backends.get("ours"), backends.get("django-celery-results")
    if not ours:
        return []
    return [
        [
            f"chord of {result['tasks']:,}: seconds until the body's result",
            f"{ours['seconds']:.2f}",
            f"{dcr['seconds']:.2f}" if dcr else "",
            f"**{dcr['seconds'] / ours['seconds']:.2f}x**" if dcr else "",
        ]
    ]


def wait_rows(result: dict) -> list[list[str]]:
    """The summary rows of wait_bench.py: get() lag pushed vs polled and vs Redis, the
    statements of a wait, and what push costs the writes."""
    rows = []
    modes = result["modes"]
    push, poll, redis = modes.get("push"), modes.get("poll"), modes.get("redis")
    threads = result["threads"]

    def lag(mode: dict | None, kind: str) -> str:
        if not mode:
            return ""
        return f"{mode[kind]['p50_ms']:.1f} / {mode[kind]['p99_ms']:.1f}"

    def ratio(base: dict | None, kind: str) -> str:
        if not (push and base):
            return ""
        return f"**{base[kind]['p50_ms'] / push[kind]['p50_ms']:.2f}x**"

    if push:
        for kind, label in (("sequential", "1 waiter"), ("threads", f"{threads} threads")):
            rows.append(
                [
                    f"wait: get() lag p50 / p99 ms after the task returns, {label}, "
                    f"{result['samples']} tasks of 20-80 ms (baseline: RESULT_PUSH=False, "
                    "polling)",
                    lag(push, kind),
                    lag(poll, kind),
                    ratio(poll, kind),
                ]
            )
        if redis:
            rows.append(
                [
                    "wait: get() lag p50 / p99 ms, 1 waiter (anchor: Celery's Redis result "
                    "backend)",
                    lag(push, "sequential"),
                    lag(redis, "sequential"),
                    ratio(redis, "sequential"),
                ]
            )
    if push and poll and "statements" in push and "statements" in poll:
        ours, base = push["statements"], poll["statements"]
        rows.append(
            [
                "wait: statements sent while waiting on a 2 s task, session listening (first "
                "wait, session opened) (baseline: polling)",
                f"{ours['next']['statements']} ({ours['first']['statements']})",
                str(base["next"]["statements"]),
                f"{base['next']['statements'] / ours['next']['statements']:.2f}x",
            ]
        )
    writes = result.get("write_path")
    if writes:
        summary = writes["summary"]
        rows.append(
            [
                "result push: backend writes/s with one listening session registered "
                "(baseline: none registered; ratio: median of the rounds' ratios)",
                summary["one registered"]["writes_per_s"],
                summary["none registered"]["writes_per_s"],
                f"**{writes['ratio']:.3f}x**",
            ]
        )
    return rows


def report(results: dict[str, dict], info: dict[str, str], total: float) -> str:
    lines = ["# django-celery-fulldbresult benchmarks", ""]
    lines.append(f"Command: `{info['command']}` (from the repository root), total {total:.0f} s.")
    lines.append("")
    lines.append(
        _common.table(["machine", ""], [[k, v] for k, v in info.items() if k != "command"])
    )
    lines += ["", "## Summary", "", headline(results), ""]
    for name, result in results.items():
        lines.append(f"## {name} ({result.get('seconds', 0):.0f} s)")
        lines.append("")
        if result.get("failed"):
            lines.append(f"FAILED with exit code {result.get('exit_code')}")
            lines.append("")
            continue
        lines.append(_common.render_sections(result["sections"]))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Run all benchmarks; write bench/results/latest.md"
    )
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument(
        "--refill", action="store_true", help="stale_plan, scheduler, stats: refill the 1M rows"
    )
    args = parser.parse_args()
    os.environ.pop("FULLDB_BENCH_REEXEC", None)
    command = os.environ.pop("FULLDB_BENCH_COMMAND", None) or shlex.join(sys.orig_argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    Path(_common.VAR_DIR).mkdir(parents=True, exist_ok=True)
    ensure_services(names)
    info = _common.machine_info(command)
    started = time.monotonic()
    results: dict[str, dict] = {}
    try:
        for name in names:
            extra = ["--refill"] if name in REFILLABLE and args.refill else []
            results[name] = run_one(name, args.quick, extra)
    except KeyboardInterrupt:
        print("[run] interrupted", file=sys.stderr)
        return 130
    total = time.monotonic() - started
    info["load average at end"] = _common.load_average()

    text = report(results, info, total)
    _common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (_common.RESULTS_DIR / "latest.md").write_text(text)
    (_common.RESULTS_DIR / "latest.json").write_text(
        json.dumps({"info": info, "results": results, "seconds": total}, indent=2, default=str)
    )
    print()
    print(text)
    print(f"[run] written {(_common.RESULTS_DIR / 'latest.md').relative_to(REPO)}")
    if not args.quick and set(names) == set(BENCHMARKS):
        (REPO / "BENCHMARKS.md").write_text(text)
        print("[run] written BENCHMARKS.md (a full run)")
    return 1 if any(r.get("failed") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
