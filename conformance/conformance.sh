#!/usr/bin/env bash
# make conformance: Celery's own t/integration suite, unchanged, against this backend on
# RabbitMQ + PostgreSQL (Redis is Celery's side channel), then a check that every test
# passed but the documented expected failures (expected-failures.txt).
#
# Environment (all optional):
#   CONFORMANCE_CELERY   Celery version whose suite runs (default 5.7.0; its sdist holds t/)
#   CONFORMANCE_DIR      where the source tree, the virtualenv and the results go
#                        (default .conformance)
#   CONFORMANCE_RERUNS   reruns of a failing test before it counts (default 2; Celery's own
#                        CI allows 5); the peer-suite score in the notes uses 0
#   CONFORMANCE_ALL=1    also run the expected failures (each costs its time-out)
#   PYTHON               interpreter for the virtualenv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${CONFORMANCE_CELERY:-5.7.0}"
work="${CONFORMANCE_DIR:-.conformance}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
python="${PYTHON:-python3}"
src="$work/celery-$version"
venv="$work/venv-$version"
backend="django_celery_fulldbresult.result_backends:DatabaseResultBackend"

if [ ! -d "$src/t/integration" ]; then
  echo "conformance: Celery $version's source tree (sdist)"
  "$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "celery==$version"
  tar xzf "$work/celery-$version.tar.gz" -C "$work"
fi

if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  echo "conformance: virtualenv $venv"
  rm -rf "$venv"
  PYTHON="$python" bash conformance/setup-venv.sh "$venv" "$src" -e .
  touch "$venv/.installed"
fi

# A virtual host of its own: other test runs on the same RabbitMQ never take its tasks.
vhost=fulldb-conformance
if command -v rabbitmqctl >/dev/null; then
  rabbitmqctl add_vhost "$vhost" >/dev/null 2>&1 || true
  rabbitmqctl set_permissions -p "$vhost" guest ".*" ".*" ".*" >/dev/null
else
  vhost=""  # the default one: run nothing else against this broker meanwhile
fi

deselect=()
if [ "${CONFORMANCE_ALL:-0}" != 1 ]; then
  while read -r test _; do
    # Exactly that test: --deselect would also take test_..._chord2 for test_..._chord.
    deselect+=(--deselect-exact "t/integration/$test")
  done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' conformance/expected-failures.txt)
fi

out="$work/results-$version"
rm -rf "$out"
status=0
TEST_BROKER="pyamqp://guest:guest@127.0.0.1:5672/$vhost" \
  PEER_SUITE_DB_NAME="${CONFORMANCE_DB_NAME:-fulldb_conformance}" \
  PEER_SUITE_OUT="$out" \
  PEER_SUITE_RERUNS="${CONFORMANCE_RERUNS:-2}" \
  PEER_SUITE_PYTHON="$venv/bin/python" \
  bash conformance/run.sh "$src" "$backend" "${deselect[@]}" || status=$?
"$venv/bin/python" conformance/check.py "$out" conformance/expected-failures.txt || status=1
exit "$status"
