#!/usr/bin/env bash
# Start PostgreSQL, MariaDB, Redis and RabbitMQ on 127.0.0.1 if they are down,
# and create the databases the tests use. With CI=true a service that cannot
# be reached afterwards is an error; otherwise it is reported and skipped.
set -u
want="${1:-all}"   # all | pg | mysql | redis | rabbit
fail=0

up() { # name, check command
  local name="$1"; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && { echo "service $name: up"; return 0; }; sleep 1; done
  echo "service $name: DOWN" >&2; fail=1; return 1
}

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
mysql_up() { mariadb -h127.0.0.1 -uroot -e 'select 1' || mysql -h127.0.0.1 -uroot -e 'select 1'; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if [ "$want" = all ] || [ "$want" = pg ]; then
  pg_up || pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  up postgresql pg_up
fi
if [ "$want" = all ] || [ "$want" = mysql ]; then
  mysql_up || start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  up mariadb mysql_up
fi
if [ "$want" = all ] || [ "$want" = redis ]; then
  redis_up || redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  up redis redis_up
fi
if [ "$want" = all ] || [ "$want" = rabbit ]; then
  rabbit_up || rabbitmq-server -detached || true
  up rabbitmq rabbit_up
fi

if [ "$fail" != 0 ] && [ "${CI:-}" = true ]; then
  echo "required services are down" >&2
  exit 1
fi
exit 0
