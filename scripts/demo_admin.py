#!/usr/bin/env python
"""The admin on the demo's data: ``make admin``, after ``make demo``.

Run from the repository root::

    .venv/bin/python scripts/demo_admin.py [ADDRESS:PORT]    # default 127.0.0.1:8000

It works on the database ``make demo`` left (scripts/demo.py: its folder, its
settings, the scheduler on): creates the superuser ``admin`` with the password
``admin`` there, or resets that user's password if it exists (this local demo
database only), then runs ``manage.py runserver`` on it until Ctrl-C. Without
a demo database it says to run ``make demo`` first and starts nothing.

``--prepare-only`` stops after the superuser (the tests use it).

Exit status: 0 (or runserver's own), 1 when there is no demo database.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The demo's folder (FULLDB_VAR_DIR/demo, testproject/var/demo by default) and the
# environment its processes run with: importing it sets them, exactly as for the demo.
import demo  # noqa: E402

USERNAME = PASSWORD = "admin"
DEFAULT_ADDRESS = "127.0.0.1:8000"


def prepare() -> str | None:
    """Create or reset the demo superuser; what is wrong (no demo database), or None."""
    import django
    from django.conf import settings

    database = Path(settings.DATABASES["default"]["NAME"])
    if not database.is_file():  # checked first: connecting would create an empty one
        return f"no demo database at {database}: run `make demo` first"
    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import DatabaseError

    from django_celery_fulldbresult.models import TaskResultMeta

    try:
        tasks = TaskResultMeta.objects.count()
    except DatabaseError as exc:  # the demo stopped before migrating
        return f"{database} holds no demo data ({exc}): run `make demo` first"
    user, created = get_user_model().objects.get_or_create(
        username=USERNAME, defaults={"email": "admin@example.com"}
    )
    user.is_active = user.is_staff = user.is_superuser = True
    user.set_password(PASSWORD)
    user.save()
    how = "created" if created else "password reset"
    print(f"demo_admin: {database} ({tasks} task rows): superuser {USERNAME!r} {how}")
    print(f"demo_admin: log in as {USERNAME} / {PASSWORD} (this local demo database only)")
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="The admin on the demo's data (make admin).")
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS, help="ADDRESS:PORT")
    parser.add_argument("--prepare-only", action="store_true", help="no runserver")
    options = parser.parse_args(argv)
    problem = prepare()
    if problem:
        print(f"demo_admin: {problem}", file=sys.stderr)
        return 1
    if options.prepare_only:
        return 0
    print(f"demo_admin: open http://{options.address}/admin/ (Ctrl-C stops the server)")
    sys.stdout.flush()
    # runserver replaces this process: Ctrl-C goes straight to it. No autoreloader (one
    # process); DEBUG is on in the test project, so runserver serves the admin's files.
    command = [sys.executable, "testproject/manage.py", "runserver", "--noreload"]
    # Django 5.2+'s "development server" banner: the lines above say what this server is.
    os.environ["DJANGO_RUNSERVER_HIDE_WARNING"] = "true"
    os.chdir(demo.ROOT)
    os.execv(sys.executable, [*command, options.address])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
