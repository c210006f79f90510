#!/usr/bin/env bash
# The sdist and the wheel as PyPI would get them: both build, `twine check` passes (the README
# renders), the wheel holds the package only (py.typed, templates, migrations), and the sdist
# holds what the tests need: a part of the suite runs from the unpacked sdist.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$PY" -m pip install -q build twine
"$PY" -m build -q -o "$out/dist" . >/dev/null
"$PY" -m twine check --strict "$out"/dist/*
wheel=("$out"/dist/*.whl)
listing="$(unzip -Z1 "${wheel[0]}")"
for needed in django_celery_fulldbresult/py.typed django_celery_fulldbresult/migrations/0001_v1_schema.py \
              django_celery_fulldbresult/templates/admin/django_celery_fulldbresult/action_confirmation.html; do
  grep -qx "$needed" <<< "$listing" || { echo "wheel lacks $needed" >&2; exit 1; }
done
if grep -v '^django_celery_fulldbresult' <<< "$listing"; then
  echo "the wheel holds more than the package (above)" >&2
  exit 1
fi
tar xzf "$out"/dist/*.tar.gz -C "$out"
cd "$out"/django_celery_fulldbresult-*/
# The unpacked sdist's own package and tests (not the checkout's): a quick part of the suite.
FULLDB_VAR_DIR="$out/var" FULLDB_QUEUE=sdist "$OLDPWD/$PY" -m pytest -q -p no:cacheprovider \
  tests/test_result_api.py tests/test_beat_unavailable.py
"$OLDPWD/$PY" -c 'import django_celery_fulldbresult, os, sys; p = django_celery_fulldbresult.__file__; print(p); sys.exit(not p.startswith(os.getcwd()))'
echo "sdist and wheel: OK"
