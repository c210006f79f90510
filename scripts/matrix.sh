#!/usr/bin/env bash
# Run the default (SQLite + filesystem broker) suite on the other supported
# combinations: the oldest (Django 4.2, Celery 5.4, Python 3.10), Django 6.0 on 3.12 and
# Django 6.1 on 3.13 (newest Celery). The main run covers Django 5.2 on 3.11, Celery 5.7.
# FULLDB_MATRIX_PAIRS="3.13" runs only the pairs of those Pythons.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() { # version -> an interpreter that really runs (pyenv shims may not)
  local v="$1" candidate
  for candidate in "$HOME"/.pyenv/versions/"$v".*/bin/python"$v" "/usr/bin/python$v" \
                   "/usr/local/bin/python$v" "python$v"; do
    if "$candidate" -c 'import sys' >/dev/null 2>&1; then
      command -v "$candidate" || echo "$candidate"
      return 0
    fi
  done
  return 1
}

run_pair() { # python-version django-spec [celery-spec] [extras]
  local py="$1" django="$2" celery="${3:->=5.4}" extras="${4:-test,beat}" venv=".venv-py$1"
  local interp
  if [ -n "${FULLDB_MATRIX_PAIRS:-}" ] && [[ " $FULLDB_MATRIX_PAIRS " != *" $py "* ]]; then
    return 0
  fi
  if ! interp="$(find_python "$py")"; then
    echo "matrix: Python $py not found" >&2
    return 1
  fi
  echo "== Django $django, Celery $celery on Python $py ($interp)"
  [ -x "$venv/bin/python" ] || "$interp" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[$extras]" "Django$django" "celery$celery"
  "$venv/bin/python" -c 'import django, celery; print("Django", django.get_version(), "Celery", celery.__version__)'
  # FULLDB_MATRIX_ARGS: extra pytest arguments (CI passes -m 'not slow': the slow
  # concurrency tests run on the main Python against all three stacks).
  eval "set -- ${FULLDB_MATRIX_ARGS:-}"
  FULLDB_VAR_DIR="$PWD/testproject/var/py$py" FULLDB_DB_NAME="fulldb_py${py/./}" \
    FULLDB_QUEUE="py${py/./}" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

run_pair 3.10 '>=4.2,<5.0' '>=5.4,<5.5'
run_pair 3.12 '>=6.0,<6.1'
# django-celery-beat 2.9 declares Django<6.1: no beat extra there (its tests check that the
# beat features say so instead).
run_pair 3.13 '>=6.1,<6.2' '>=5.4' test
