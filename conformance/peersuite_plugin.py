"""pytest plugin: run Celery's own ``t/integration`` suite on a Django result backend.

Load it with ``-p peersuite_plugin`` (``run.sh`` puts this folder on
``PYTHONPATH``).  Celery's files are used as they are; this plugin only

1. picks broker and backend the way Celery's suite expects: through the
   ``TEST_BROKER`` / ``TEST_BACKEND`` environment variables that
   ``t/integration/conftest.py`` reads at import time (its ``celery_config``
   fixture turns them into ``broker_url`` / ``result_backend`` with
   ``result_extended=True``);
2. sets ``DJANGO_SETTINGS_MODULE`` and calls ``django.setup()`` before that
   conftest is imported, so every Celery app the suite creates (per-test
   ``celery_app`` and the session worker's app) gets Celery's Django fixup,
   exactly as in a Django project: prefork children drop inherited DB
   connections and every task closes its connections before and after it runs;
3. recreates the PostgreSQL database and runs ``migrate`` once per session;
4. closes the test thread's DB connections around every test (the test thread
   reads results while worker processes/threads write them; no test runs in a
   transaction, so what the worker commits is what the test reads);
5. caps per-test timeouts (Celery marks many tests ``timeout(300)``) so a
   hanging backend costs at most ``--peer-timeout-cap`` seconds per test, and
   keeps that limit alive after a failure: pytest-timeout cancels its timer on
   the first failure (every failing subtest counts) and a ``subtests.test()``
   block swallows its Timeout, so without this a test looping over subtests
   (e.g. 22 un-timed ``.get()`` calls in ``test_revoked_by_headers_complex_canvas``)
   or a teardown waiting for an idle worker could run forever.

Reruns are left to pytest-rerunfailures' ``--force-reruns`` (run.sh passes 0).
"""

import contextlib
import os
import signal
import time
import types

import pytest

DEFAULT_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
DEFAULT_SETTINGS = "peersuite_settings"


def pytest_addoption(parser):
    group = parser.getgroup(
        "peersuite", "peer-suite: Celery integration suite on a Django result backend"
    )
    group.addoption(
        "--peer-backend",
        default=None,
        help="Celery result_backend under test (sets TEST_BACKEND; default: $TEST_BACKEND)",
    )
    group.addoption(
        "--peer-timeout-cap",
        type=float,
        default=float(os.environ.get("PEER_SUITE_TIMEOUT_CAP", "90")),
        help="lower every timeout marker above this many seconds to it (default 90)",
    )
    group.addoption(
        "--deselect-exact",
        action="append",
        default=[],
        help="deselect this test id only (pytest's --deselect also takes every id it prefixes)",
    )
    group.addoption(
        "--peer-keep-db",
        action="store_true",
        default=os.environ.get("PEER_SUITE_KEEP_DB") == "1",
        help="do not drop/recreate the database at session start (still migrates)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """Runs before t/integration/conftest.py is imported."""
    ns = early_config.known_args_namespace
    backend = getattr(ns, "peer_backend", None) or os.environ.get("TEST_BACKEND")
    if not backend:
        raise pytest.UsageError("peer-suite: give the backend with --peer-backend or TEST_BACKEND")
    os.environ["TEST_BACKEND"] = backend
    os.environ.setdefault("TEST_BROKER", DEFAULT_BROKER)
    os.environ.setdefault("REDIS_HOST", "127.0.0.1")  # Celery's helpers use Redis as a side channel
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", DEFAULT_SETTINGS)

    import django

    django.setup()


def _reset_database(keep):
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    db = settings.DATABASES["default"]
    if not keep and "postgresql" in db["ENGINE"]:
        import psycopg
        from psycopg import sql

        params = {
            "host": db.get("HOST"),
            "port": db.get("PORT"),
            "user": db.get("USER"),
            "password": db.get("PASSWORD"),
            "dbname": os.environ.get("PEER_SUITE_MAINTENANCE_DB", "postgres"),
        }
        params = {k: v for k, v in params.items() if v not in (None, "")}
        with psycopg.connect(autocommit=True, **params) as conn:
            name = sql.Identifier(db["NAME"])
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    call_command("migrate", interactive=False, verbosity=0, run_syncdb=True)
    connections.close_all()


def _resolve_backend(spec):
    """The backend class Celery will load for ``spec`` (without creating an app)."""
    from celery.app.backends import by_url

    loader = types.SimpleNamespace(override_backends={})
    cls, url = by_url(spec, loader)
    return cls, url


def pytest_report_header(config):
    import celery
    import django
    import kombu
    from django.conf import settings

    spec = os.environ["TEST_BACKEND"]
    try:
        cls, _ = _resolve_backend(spec)
        where = f"{cls.__module__}.{cls.__qualname__}"
    except Exception as exc:  # reported, the suite will fail loudly anyway
        where = f"UNRESOLVED ({exc!r})"
    db = settings.DATABASES["default"]
    shadowed = str(config.rootpath) in os.path.realpath(celery.__file__)
    return [
        f"peer-suite: celery imported from {os.path.dirname(celery.__file__)}"
        + ("  WARNING: that is the checkout, not the installed package" if shadowed else ""),
        f"peer-suite: TEST_BACKEND={spec} -> {where}",
        f"peer-suite: TEST_BROKER={os.environ['TEST_BROKER']}",
        f"peer-suite: celery {celery.__version__}, kombu {kombu.__version__}, "
        f"django {django.get_version()}, "
        f"db {db['ENGINE'].rsplit('.', 1)[-1]}://{db['HOST']}:{db['PORT']}/{db['NAME']}",
        f"peer-suite: INSTALLED_APPS={settings.INSTALLED_APPS}",
        f"peer-suite: timeout cap {config.getoption('peer_timeout_cap'):g}s",
    ]


def pytest_sessionstart(session):
    t0 = time.monotonic()
    _reset_database(session.config.getoption("peer_keep_db"))
    # fail fast if the backend cannot even be imported
    _resolve_backend(os.environ["TEST_BACKEND"])
    session.config._peersuite_setup_s = time.monotonic() - t0


def pytest_collection_modifyitems(session, config, items):
    exact = set(config.getoption("deselect_exact"))
    if exact:
        dropped = [item for item in items if item.nodeid.split("[")[0] in exact]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if item not in dropped]
    cap = config.getoption("peer_timeout_cap")
    if not cap or cap <= 0:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            continue  # the global --timeout applies
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
        if value is None or float(value) > cap:
            kwargs = {k: v for k, v in marker.kwargs.items() if k != "timeout"}
            item.add_marker(pytest.mark.timeout(cap, **kwargs), append=False)


REARM_S = 5.0  # after the limit fired: fire again this often
TEARDOWN_GRACE_S = 30.0  # after a failed call: at least this long to tear down
_REARMING = pytest.StashKey[object]()
_DEADLINE = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Keep pytest-timeout's limit alive for the whole item.

    pytest-timeout (method "signal") arms SIGALRM once per item, but
    (a) its own ``pytest_exception_interact`` hook cancels the timer on the
    first failure, and pytest-subtests calls that hook for every failing
    subtest; so after one failed subtest, or a failed call, the rest of the
    test and its teardown (``manager.wait_until_idle()`` loops until the worker
    is idle) run with no limit at all;
    (b) a ``subtests.test()`` block swallows the Timeout exception itself.
    Here the handler re-arms itself after firing, and the timer is re-armed
    after each failure with the time left: at least REARM_S seconds after a
    failed subtest, at least TEARDOWN_GRACE_S after the test's call failed
    (so the worker can finish the test's tasks before the next test starts).
    """
    handler = signal.getsignal(signal.SIGALRM)
    if not callable(handler) or getattr(handler, "_peersuite_rearming", False):
        return
    remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    if not remaining:
        return

    def rearming(signum, frame):
        __tracebackhide__ = True
        signal.setitimer(signal.ITIMER_REAL, REARM_S)
        handler(signum, frame)

    rearming._peersuite_rearming = True
    signal.signal(signal.SIGALRM, rearming)
    item.stash[_REARMING] = rearming
    item.stash[_DEADLINE] = time.monotonic() + remaining


@pytest.hookimpl(trylast=True)
def pytest_exception_interact(node, report):
    # runs after pytest-timeout's own (tryfirst) hook has cancelled the timer;
    # pytest-timeout's cancel at the end of the item still clears this one.
    rearming = node.stash.get(_REARMING, None) if isinstance(node, pytest.Item) else None
    if rearming is None or getattr(report, "when", None) == "teardown":
        return
    is_subtest = hasattr(report, "context")  # pytest-subtests' SubTestReport
    floor = REARM_S if is_subtest else TEARDOWN_GRACE_S
    remaining = max(node.stash[_DEADLINE] - time.monotonic(), floor)
    signal.signal(signal.SIGALRM, rearming)
    signal.setitimer(signal.ITIMER_REAL, remaining)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Tag tests whose expected TimeoutError did not happen because the result arrived.

    Celery marks some tests ``xfail(raises=TimeoutError)`` and asserts with
    ``pytest.raises(TimeoutError)`` that a result never arrives (a known bug of
    its Redis result consumer, e.g. #6734).  When a backend does deliver the
    result, pytest reports "DID NOT RAISE ... TimeoutError" as a plain failure;
    summarize.py counts a test tagged here as xpassed instead.
    """
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or call.excinfo is None:
        return
    marker = item.get_closest_marker("xfail")
    raises = marker.kwargs.get("raises") if marker else None
    if raises is None:
        return
    names = [r.__name__ for r in (raises if isinstance(raises, tuple) else (raises,))]
    text = str(call.excinfo.value)
    if "DID NOT RAISE" in text and any(n in text for n in names):
        # junitxml writes the properties of the teardown report, copied from the item
        item.user_properties.append(
            ("peersuite_outcome", "xpassed: expected timeout did not happen")
        )


def _close_test_thread_connections():
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        with contextlib.suppress(Exception):
            conn.close()  # also ends a transaction a test may have left open


@pytest.fixture(autouse=True)
def _peersuite_db_hygiene():
    """Fresh DB connection for the test thread in every test, none left open after."""
    _close_test_thread_connections()
    yield
    _close_test_thread_connections()
