"""Shared set-up of the benchmark scripts: isolation, database, statistics, output.

Every script calls :func:`setup` before it imports anything from Django. The
environment is forced to the benchmark's own database, queue and var dir so
that a benchmark never touches what the tests or the demo use.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
RESULTS_DIR = BENCH_DIR / "results"

DB_NAME = "fulldb_bench"
#: stale_plan.py keeps its 1M rows in a database of its own, so that the
#: truncations of stores.py and e2e.py do not throw the fill away.
STALE_DB_NAME = "fulldb_bench_stale"
QUEUE = "bench"
VAR_DIR = "/tmp/fulldb-bench"
#: scheduler.py: a database, a queue and a var dir of its own (its workers and
#: its sender must never meet the other benchmarks' messages or rows).
SCHED_DB_NAME = "fulldb_bench_sched"
SCHED_QUEUE = "bench_sched"
SCHED_VAR_DIR = "/tmp/fulldb-bench-sched"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

#: Names other people's runs use: a benchmark must never touch them.
FORBIDDEN_DBS = frozenset(
    {"test_fulldbresult", "fulldbresult", "fulldb_dev", "postgres", "template0", "template1"}
)
FORBIDDEN_QUEUES = frozenset({"celery", "dev"})


def check_names(db_name: str, queue: str) -> None:
    """Refuse the databases and queues of the tests, the demo and the developers."""
    if db_name in FORBIDDEN_DBS or db_name.startswith("test_"):
        raise SystemExit(f"refusing to run against the database {db_name!r}")
    if queue in FORBIDDEN_QUEUES or queue.startswith("celery-"):
        raise SystemExit(f"refusing to run against the queue {queue!r}")


TASK_TABLE = "django_celery_fulldbresult_taskresultmeta"
DCR_TABLE = "django_celery_results_taskresult"


def reexec_in_venv() -> None:
    """``python bench/<script>.py`` with a Python that lacks the project: use the venv's."""
    try:
        import celery  # noqa: F401
        import django  # noqa: F401
    except ImportError:
        venv = REPO / ".venv" / "bin" / "python"
        if venv.exists() and not os.environ.get("FULLDB_BENCH_REEXEC"):
            os.environ["FULLDB_BENCH_REEXEC"] = "1"
            os.environ.setdefault("FULLDB_BENCH_COMMAND", " ".join(sys.orig_argv))
            os.execv(str(venv), [str(venv), *sys.orig_argv[1:]])
        raise


def bench_env(
    db_name: str = DB_NAME, queue: str = QUEUE, var_dir: str = VAR_DIR, **extra: str
) -> dict[str, str]:
    """The environment of a benchmark process (and of the worker it starts).

    The scheduler is off unless ``extra`` turns it on (``FULLDB_SCHEDULE_ETA="1"``).
    """
    check_names(db_name, queue)
    env = dict(os.environ)
    for name in (
        "FULLDB_TEST_DB",
        "FULLDB_BACKEND",
        "FULLDB_DB_REUSE_MAX",
        "FULLDB_SCHEDULE_ETA",
        "FULLDB_TRACK_STARTED",
        # Celery reads it before the project's settings (celery.app.utils.Settings): one
        # inherited from the shell would replace the backend a benchmark measures.
        "CELERY_RESULT_BACKEND",
    ):
        env.pop(name, None)
    path = [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update(
        {
            "FULLDB_STACK": "pg-rabbit",
            "FULLDB_DB_NAME": db_name,
            "FULLDB_QUEUE": queue,
            "FULLDB_VAR_DIR": var_dir,
            # DEBUG=True makes Django keep every query in memory (and Celery warn):
            # measure what a production deployment runs.
            "FULLDB_DEBUG": "0",
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
        }
    )
    env.update(extra)
    return env


def _terminate(signum: int, frame: Any) -> None:
    # Turn SIGTERM into SystemExit so that every ``finally`` (stopping the
    # worker above all) runs when run.py or a user stops a script.
    raise SystemExit(128 + signum)


def ensure_database(name: str) -> None:
    import psycopg

    with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=10, **PG) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not found:
            conn.execute(f'CREATE DATABASE "{name}"')


def setup(
    db_name: str = DB_NAME,
    migrate: bool = True,
    queue: str = QUEUE,
    var_dir: str = VAR_DIR,
    **extra: str,
) -> None:
    """Isolate this process, create and migrate its database, and set Django up."""
    signal.signal(signal.SIGTERM, _terminate)
    env = bench_env(db_name, queue, var_dir, **extra)
    os.environ.clear()
    os.environ.update(env)
    Path(var_dir).mkdir(parents=True, exist_ok=True)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ensure_database(db_name)

    import django

    django.setup()
    if migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)


def set_setting(name: str, value: Any) -> None:
    """Set ``DJANGO_CELERY_FULLDBRESULT_<name>`` for the rest of this process through
    ``override_settings`` (never undone): the package reads its settings once until Django's
    ``setting_changed`` says one changed (``django_celery_fulldbresult.conf``)."""
    from django.test import override_settings

    override_settings(**{"DJANGO_CELERY_FULLDBRESULT_" + name: value}).enable()


def truncate(*tables: str, using: str = "default") -> None:
    from django.db import connections

    with connections[using].cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables))


# -- statistics -------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


# -- libpq trace: what really goes over the wire -----------------------------


@contextmanager
def wire_trace(wrapper: Any):
    """Count the client messages a Django connection sends (psycopg 3 only).

    Yields a dict filled on exit with ``round_trips`` (simple ``Query`` messages
    plus extended-protocol ``Sync`` messages, i.e. BEGIN/COMMIT included) and
    ``bytes_sent``. The dict stays empty when tracing is not available.
    """
    out: dict[str, int] = {}
    wrapper.ensure_connection()
    pgconn = getattr(wrapper.connection, "pgconn", None)
    if pgconn is None or not hasattr(pgconn, "trace"):
        yield out
        return
    fd, path = tempfile.mkstemp(prefix="pgtrace-", dir=VAR_DIR)
    pgconn.trace(fd)  # libpq owns the descriptor from here on (untrace closes it)
    try:
        yield out
    finally:
        pgconn.untrace()
        trips = sent = 0
        for line in Path(path).read_text(errors="replace").splitlines():
            fields = line.split("\t")
            if "F" not in fields[:2]:
                continue
            start = fields.index("F")
            kind = fields[start + 2] if len(fields) > start + 2 else ""
            if kind in ("Query", "Sync"):
                trips += 1
            if fields[start + 1].isdigit():
                sent += int(fields[start + 1])
        Path(path).unlink(missing_ok=True)
        out.update(round_trips=trips, bytes_sent=sent)


# -- machine and versions ---------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _pg_version() -> str:
    try:
        import psycopg

        with psycopg.connect(dbname="postgres", connect_timeout=5, **PG) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"unknown ({exc.__class__.__name__})"


def _rabbit_version() -> str:
    try:
        import amqp

        conn = amqp.Connection(
            "127.0.0.1:5672", userid="guest", password="guest", connect_timeout=5
        )
        conn.connect()
        try:
            value = conn.server_properties.get("version", "unknown")
        finally:
            conn.close()
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"unknown ({exc.__class__.__name__})"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(command: str) -> dict[str, str]:
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "commit": _git_commit(),
        "cpu": _cpu_model(),
        "cores": f"{cores} ({usable} usable by this process)",
        "memory": _memory(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "django": _version("Django"),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "django-celery-results": _version("django-celery-results"),
        "psycopg": _version("psycopg"),
        "postgresql": _pg_version(),
        "rabbitmq": _rabbit_version(),
        "load average at start": load_average(),
    }


def load_average() -> str:
    """1/5/15-minute load: other jobs on the machine skew the figures."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(re.findall(r"\d+", line)[0])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return "unknown"


# -- output -----------------------------------------------------------------


#: Seconds a child bench process gets to stop its worker before it is killed.
CHILD_STOP_TIMEOUT = 60.0


def run_child(
    label: str, script: str, argv: list[str], child: str, out: Path, env: dict[str, str]
) -> dict[str, Any] | None:
    """Run ``script --child <child> --child-out <out>`` with ``env`` and return the JSON it
    wrote (None when it failed). Ctrl-C reaches the child too (it stops its worker in a
    finally); run.py's time limit (SIGTERM, turned into SystemExit here) is passed on."""
    out.unlink(missing_ok=True)
    command = [sys.executable, script, *argv, "--child", child, "--child-out", str(out)]
    print(f"{label}: {child}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, cwd=REPO, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _wait_child(proc)
        raise
    finally:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            _wait_child(proc)
    if code != 0 or not out.exists():
        print(f"{label}: {child} FAILED (exit {code})", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def _wait_child(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=CHILD_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def render_sections(sections: Sequence[dict[str, Any]]) -> str:
    """Sections are dicts: title, optional text, headers + rows, optional notes/code."""
    parts = []
    for section in sections:
        parts.append(f"### {section['title']}\n")
        if section.get("text"):
            parts.append(section["text"] + "\n")
        if section.get("headers"):
            parts.append(table(section["headers"], section["rows"]) + "\n")
        for note in section.get("notes", ()):
            parts.append(f"- {note}")
        if section.get("notes"):
            parts.append("")
        if section.get("code"):
            parts.append("```\n" + section["code"].rstrip() + "\n```\n")
    return "\n".join(parts)


def finish(name: str, result: dict[str, Any], json_out: str | None) -> None:
    """Print a script's own report; hand the raw result to run.py when asked."""
    print(render_sections(result["sections"]))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2, default=str))


def worker_command(
    queue: str, node: str, concurrency: int, *extra: str, loglevel: str = "WARNING"
) -> list[str]:
    """A prefork ``celery worker`` of the test project on ``queue``, without heartbeats."""
    from testproject.workers import worker_command as command

    return command(node, queue, "prefork", concurrency, loglevel, ("--without-heartbeat", *extra))


# -- a worker subprocess of a benchmark --------------------------------------------------

#: A warm shutdown normally takes about 2 s. Stopped in the middle of a run, a prefork child
#: can wait up to ~30 s for the parent to read its results (billiard's
#: _ensure_messages_consumed): past this, SIGKILL the group.
WORKER_STOP_TIMEOUT = 15.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pid: int) -> None:
    """SIGTERM, wait, then SIGKILL the process's session (its pool children)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def reap_leftover_worker(pidfile: Path, node_prefix: str) -> None:
    """Stop a worker an earlier, killed run of the same script left behind (its pid file)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmdline = ""
    if node_prefix in cmdline and _alive(pid):
        print(f"stopping the worker {pid} left by an earlier run", file=sys.stderr)
        _stop_group(pid)
    pidfile.unlink(missing_ok=True)


class WorkerProcess:
    """A ``celery worker`` subprocess in its own session, stopped whatever happens.

    ``stop()`` ignores SIGINT and SIGTERM while it stops the worker (a second Ctrl-C, or
    run.py's SIGTERM at its time limit, must not leave the worker running); the pid file
    lets the next run stop a worker a killed run left behind (``reap_leftover_worker``).
    """

    def __init__(
        self, command: list[str], env: dict[str, str], log_path: Path, pidfile: Path
    ) -> None:
        self.command, self.env, self.log_path, self.pidfile = command, env, log_path, pidfile
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            )
        self.pidfile.write_text(str(self.proc.pid))

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {self.proc.returncode}; log:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        """SIGTERM (warm shutdown), wait; SIGKILL the process group if it hangs."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        print(f"  stopping worker {proc.pid}", file=sys.stderr)
        previous = {
            signum: signal.signal(signum, signal.SIG_IGN)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=WORKER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print("worker did not stop in time: SIGKILL", file=sys.stderr)
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stray pool children, if any
            return proc.wait(timeout=WORKER_STOP_TIMEOUT)
        finally:
            self.pidfile.unlink(missing_ok=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


# -- CPU time by process group (where a task's time goes) ---------------------

#: /proc/<pid>/stat fields (after the command name): utime, stime, cutime, cstime.
_CPU_FIELDS = slice(11, 15)


def _proc_stat(pid: int) -> tuple[str, int, list[int]] | None:
    """(command name, parent pid, [utime, stime, cutime, cstime] in clock ticks)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[1]), [int(v) for v in fields[_CPU_FIELDS]]


#: The groups of ``cpu_by_group``.
CPU_GROUPS = ("worker main", "worker pool", "postgres", "rabbitmq", "redis", "publisher")


def cpu_by_group(worker_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far, by group: the worker's main process and its pool, ``postgres``
    (every server process, and what exited ones left to the postmaster), ``rabbitmq``,
    ``redis`` (the server), ``publisher`` (this process: publishing and publish tracking).
    Differences of two snapshots say where an interval's CPU went (Linux only; empty
    elsewhere)."""
    if not Path("/proc/self/stat").exists():
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    tree = {worker_pid} if worker_pid else set()
    grew = True
    while grew:
        children = {pid for pid, (_, ppid, _) in stats.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    groups = dict.fromkeys(CPU_GROUPS, 0)
    for pid, (name, ppid, (utime, stime, cutime, cstime)) in stats.items():
        own = utime + stime
        if pid == worker_pid:
            groups["worker main"] += own
        elif pid in tree:
            groups["worker pool"] += own
        elif name == "postgres":
            # The postmaster also holds the CPU of server processes that exited.
            postmaster = stats.get(ppid, ("",))[0] != "postgres"
            groups["postgres"] += own + (cutime + cstime if postmaster else 0)
        elif name == "beam.smp":
            groups["rabbitmq"] += own
        elif name == "redis-server":
            groups["redis"] += own
        elif pid == os.getpid():
            groups["publisher"] += own
    return {group: value / ticks for group, value in groups.items()}
