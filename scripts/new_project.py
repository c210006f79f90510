"""A newcomer's first project, from the built wheel and the README alone.

Builds the wheel (or takes ``--wheel``), makes a fresh virtualenv with the given Python and
Django, installs the wheel with the extras the README names, runs ``django-admin
startproject proj``, writes ``proj/celery.py`` and the settings **copied from the README's
Installation section** (so a missing step there fails here), migrates, runs ``manage.py
check``, starts a real worker (Redis broker, SQLite database), sends a task and reads its
result and its row back. Exits non-zero on any failure.

    python scripts/new_project.py --python python3.13 --django '>=6.1,<6.2'
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_block(containing: str) -> str:
    """The README's code block that contains ``containing``, dedented."""
    text = (REPO / "README.rst").read_text()
    for match in re.finditer(r"\.\. code-block:: \w+\n\n((?:    .*\n|\n)+)", text):
        block = "\n".join(line[4:] for line in match.group(1).splitlines())
        if containing in block:
            return block.strip() + "\n"
    raise SystemExit(f"README.rst has no code block containing {containing!r}")


def run(*command: str, cwd: Path | None = None, env: dict | None = None) -> str:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--django", default=">=4.2", help="a version specifier for Django")
    parser.add_argument("--extras", default="redis", help="the extras to install")
    parser.add_argument("--wheel", help="a built wheel (default: build one)")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--keep", action="store_true", help="keep the project directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fulldb-newproject-"))
    wheel = args.wheel
    if wheel is None:
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(REPO))
        (wheel,) = (str(path) for path in work.glob("django_celery_fulldbresult-*.whl"))
    venv = work / "venv"
    run(args.python, "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "-q", f"{wheel}[{args.extras}]", f"Django{args.django}")
    print(
        run(
            python,
            "-c",
            "import django, celery; print('Django', django.get_version(), "
            "'Celery', celery.__version__)",
        ),
        end="",
    )

    # The project, as the README says.
    run(str(venv / "bin" / "django-admin"), "startproject", "proj", cwd=work)
    project = work / "proj"
    (project / "proj" / "celery.py").write_text(readme_block('app = Celery("proj")'))
    init = project / "proj" / "__init__.py"
    init.write_text(init.read_text() + "from .celery import app as celery_app\n")
    run(python, "manage.py", "startapp", "shop", cwd=project)
    (project / "shop" / "tasks.py").write_text(
        "from celery import shared_task\n\n\n@shared_task\ndef add(x, y):\n    return x + y\n"
    )
    settings = project / "proj" / "settings.py"
    settings.write_text(
        settings.read_text()
        + "\n"
        + readme_block("# settings.py")
        + 'INSTALLED_APPS += ["shop"]\n'
        + f"CELERY_BROKER_URL = {args.broker!r}  # a database of its own\n"
    )
    manage = [python, "manage.py"]
    env = {**os.environ, "PYTHONPATH": str(project)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    run(*manage, "migrate", "-v0", cwd=project, env=env)
    print(run(*manage, "check", cwd=project, env=env), end="")

    queue = f"newproject{os.getpid()}"
    worker = subprocess.Popen(
        [python, "-m", "celery", "-A", "proj", "worker", "-l", "INFO", "-P", "solo", "-Q", queue],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        script = (
            "import django; django.setup()\n"
            "from shop.tasks import add\n"
            "from django_celery_fulldbresult.models import TaskResultMeta\n"
            f"result = add.apply_async((2, 3), queue={queue!r})\n"
            "assert result.get(timeout=60) == 5, result.state\n"
            "row = TaskResultMeta.objects.get(task_id=result.id)\n"
            "print('row:', row.task, row.status, row.get_call())\n"
            "assert (row.task, row.status) == ('shop.tasks.add', 'SUCCESS')\n"
        )
        started = time.monotonic()
        env_run = {**env, "DJANGO_SETTINGS_MODULE": "proj.settings"}
        print(run(python, "-c", script, cwd=project, env=env_run), end="")
        print(f"task round trip in {time.monotonic() - started:.1f}s")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            output, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            output, _ = worker.communicate()
        if "Traceback" in output:
            print(output[-4000:])
            raise SystemExit("the worker logged a traceback")
    if args.keep:
        print("project kept in", project)
    else:
        shutil.rmtree(work)
    print("new project: OK")


if __name__ == "__main__":
    main()
