#!/usr/bin/env bash
# Make sure the services the test suite talks to are up on 127.0.0.1: PostgreSQL (5432),
# Redis (6379), RabbitMQ (5672). A service that is installed but stopped is started with
# the machine's usual command; one that is not installed is reported, and the tests that
# need it skip (or fail under CI=true). Never fails by itself.
set -u

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port, seconds
  local i
  for ((i = 0; i < $2 * 4; i++)); do up "$1" && return 0; sleep 0.25; done
  return 1
}

ensure() {  # name, port, how to tell it is installed, start command
  local name=$1 port=$2 installed=$3 start=$4
  if up "$port"; then echo "services: $name is up on 127.0.0.1:$port"; return; fi
  if ! eval "$installed" >/dev/null 2>&1; then
    echo "services: $name is not installed; its tests will skip (fail under CI=true)"
    return
  fi
  echo "services: starting $name"
  eval "$start" >/dev/null 2>&1 || true
  if wait_for "$port" 60; then
    echo "services: $name is up on 127.0.0.1:$port"
  else
    echo "services: $name did not come up on 127.0.0.1:$port"
  fi
}

ensure PostgreSQL 5432 "command -v pg_ctlcluster" \
  'pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start'
ensure Redis 6379 "command -v redis-server" \
  'mkdir -p /var/lib/redis /var/log/redis; redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'
ensure RabbitMQ 5672 "command -v rabbitmq-server" 'rabbitmq-server -detached'
exit 0
