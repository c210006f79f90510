"""The nine soak and fault scenarios of ``python -m soak`` (soak/), at a smaller size.

Real worker, sender and publisher processes on the test database and the stack's broker;
outages go through soak/faultproxy.py (the services themselves are never stopped). Each test
fails with the scenario's summary line, which names every problem found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from soak import harness, scenarios

from .conftest import REPO, STACK, queue_name

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.services,
    pytest.mark.skipif(
        STACK == "sqlite",
        reason="soak scenarios target the server stacks (FULLDB_STACK=pg-rabbit or "
        "maria-redis): outages, kills and races of several processes on one SQLite file and "
        "kombu's filesystem broker would test SQLite's single writer, not the package",
    ),
]


@pytest.fixture
def ctx(django_db_setup, tmp_path, celery_app) -> Iterator[harness.Context]:
    env = {**os.environ, "FULLDB_TEST_DB": "1", "PYTHONPATH": str(REPO)}
    env.pop("FULLDB_SCHEDULE_ETA", None)
    context = harness.Context(
        stack=STACK,
        queue=queue_name("soak"),
        work_dir=tmp_path,
        child_env=env,
        sizes=harness.Sizes.small(),
    )
    try:
        yield context
    finally:
        harness.stop(context)


def run(key: str, ctx: harness.Context) -> None:
    outcome = scenarios.run_scenario(key, ctx)
    print(outcome.line())
    assert outcome.ok, outcome.line()


def test_load_every_task_ends_right_delayed_ones_once_and_not_early(ctx):
    run("1", ctx)


def test_killed_worker_tasks_are_reported_or_rerun_with_acks_late(ctx):
    run("2", ctx)


def test_killed_senders_claims_come_back_and_every_task_runs_exactly_once(ctx):
    run("3", ctx)


def test_broker_outage_loses_and_duplicates_nothing_and_publishers_fail_fast(ctx):
    run("4", ctx)


def test_database_outage_loses_no_result_and_the_sender_resumes(ctx):
    run("5", ctx)


def test_races_publish_in_atomic_and_retries_racing_their_retry_write(ctx):
    run("6", ctx)


def test_bad_input_gets_clear_errors_and_never_stops_the_table(ctx):
    run("7", ctx)


def test_run_once_copies_of_messages_redelivered_or_published_twice_never_run(ctx):
    run("8", ctx)


def test_killed_worker_tasks_are_resent_failed_or_reported_by_policy_by_the_sender(ctx):
    run("9", ctx)
