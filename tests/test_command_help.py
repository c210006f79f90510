"""Every command of the package says in its --help where its documentation is, and that
page has a section for it."""

from __future__ import annotations

import pkgutil

import pytest
from django.core.management import load_command_class

from django_celery_fulldbresult.management import commands
from django_celery_fulldbresult.management.base import DOCS

from .conftest import REPO

NAMES = sorted(module.name for module in pkgutil.iter_modules(commands.__path__))


def test_the_commands_are_found():
    assert {"find_stale_tasks", "run_scheduler", "task_stats"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_help_points_to_the_command_in_the_docs_that_ship(name):
    help_text = (
        load_command_class("django_celery_fulldbresult", name)
        .create_parser("manage.py", name)
        .format_help()
    )
    anchor = name.replace("_", "-")
    assert f"{DOCS}#{anchor}\n" in help_text
    page = (REPO / "docs" / "ref" / "commands.rst").read_text()
    title = f"``{name}``"
    assert f"\n{title}\n{'=' * len(title)}\n" in page
