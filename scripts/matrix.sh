#!/usr/bin/env bash
# Run the default (SQLite + filesystem broker) suite on the other supported
# Django/Python pairs: Django 4.2 on Python 3.10 and Django 6.0 on Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() { # version -> interpreter path
  local v="$1"
  for candidate in "python$v" "$HOME/.pyenv/versions/$v"*/bin/python"$v" "/usr/bin/python$v"; do
    if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return 0; fi
    if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

run_pair() { # python-version django-spec
  local py="$1" django="$2" venv=".venv-py$1"
  local interp
  if ! interp="$(find_python "$py")"; then
    echo "matrix: Python $py not found" >&2
    return 1
  fi
  echo "== Django $django on Python $py ($interp)"
  [ -x "$venv/bin/python" ] || "$interp" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e '.[test]' "Django$django"
  "$venv/bin/python" -c 'import django, celery; print("Django", django.get_version(), "Celery", celery.__version__)'
  FULLDB_VAR_DIR="$PWD/testproject/var/py$py" "$venv/bin/python" -m pytest -q -p no:cacheprovider
}

run_pair 3.10 '>=4.2,<5.0'
run_pair 3.12 '>=6.0,<6.1'
