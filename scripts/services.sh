#!/usr/bin/env bash
# Bring up the servers the tests need, and say what was done or why it cannot be.
#
#   scripts/services.sh            every service below
#   scripts/services.sh postgres   just the named ones (postgres, rabbitmq, nats, redis, mosquitto)
#
# Each service is three functions: <name>_up (is it answering?), <name>_start (start an
# installed server) and <name>_install (install it), and its name in ALL. Installing needs
# root or sudo, as Chromium's install does.
set -euo pipefail

ALL=(postgres rabbitmq nats redis mosquitto)
PG_HOST=127.0.0.1
PG_PORT=5432
AMQP_HOST=127.0.0.1
AMQP_PORT=5672
NATS_HOST=127.0.0.1
NATS_PORT=4222
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
MQTT_HOST=127.0.0.1
MQTT_PORT=1883

say() { echo "services: $*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 99; fi
}

# Whether something accepts TCP connections on host:port (bash's /dev/tcp: no client needed).
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

wait_for() {  # name, check command...: up to 30 s
  local name=$1; shift
  for _ in $(seq 60); do "$@" && return 0; sleep 0.5; done
  say "$name did not come up within 30 s"; return 1
}

# --- PostgreSQL ------------------------------------------------------------------------------
postgres_up() {
  if command -v pg_isready >/dev/null; then pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else port_open "$PG_HOST" "$PG_PORT"; fi
}

postgres_installed() { [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; }

postgres_start() {
  local version
  version=$(ls /etc/postgresql | sort -V | tail -1)
  say "PostgreSQL $version is installed but not answering on $PG_HOST:$PG_PORT: starting its cluster 'main'"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

postgres_install() {
  say "PostgreSQL is not installed: installing it with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
  PG_INSTALLED_HERE=1
}

# A cluster installed here takes local connections without a password, as the tests expect
# (Debian's default asks TCP clients for one). A server that was already there is left as it
# was configured: if the tests cannot connect to it, this says what to change.
postgres_trust_local() {
  local version hba
  version=$(ls /etc/postgresql | sort -V | tail -1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  say "allowing local connections without a password in $hba (a cluster installed just now)"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
}

# The tests connect as the user running them, without a password, to the database 'test'.
postgres_prepare() {
  local me
  me=$(id -un)
  command -v psql >/dev/null || return 0
  if ! psql -h "$PG_HOST" -p "$PG_PORT" -d test -Atc "SELECT 1" >/dev/null 2>&1; then
    [ "${PG_INSTALLED_HERE:-0}" = 1 ] && postgres_trust_local
    say "creating the role '$me' and the database 'test'"
    as_root su postgres -c "createuser --superuser '$me'" 2>/dev/null || true  # may exist
    as_root su postgres -c "createdb -O '$me' test" 2>/dev/null || true
    if ! psql -h "$PG_HOST" -p "$PG_PORT" -d test -Atc "SELECT 1" >/dev/null 2>&1; then
      say "PostgreSQL answers, but '$me' cannot connect to the database 'test' on $PG_HOST:$PG_PORT without a password;"
      say "  allow it in pg_hba.conf (host test all 127.0.0.1/32 trust) and reload"
      return 1
    fi
  fi
}

# --- RabbitMQ --------------------------------------------------------------------------------
# Up when the port answers the AMQP 0-9-1 protocol header with a Connection.Start frame (frame
# type 1 on channel 0, class 10 method 10): a RabbitMQ that is up, not just an open port.
rabbitmq_up() {
  port_open "$AMQP_HOST" "$AMQP_PORT" || return 1
  local frame
  frame=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "AMQP\x00\x00\x09\x01" >&3
                             head -c 11 <&3' "$AMQP_HOST" "$AMQP_PORT" 2>/dev/null \
          | od -An -tx1 | tr -d ' \n')
  [[ $frame =~ ^010000[0-9a-f]{8}000a000a$ ]]
}

rabbitmq_installed() { command -v rabbitmq-server >/dev/null; }

rabbitmq_start() {
  say "RabbitMQ is installed but not answering on $AMQP_HOST:$AMQP_PORT: starting it"
  as_root rabbitmq-server -detached
}

rabbitmq_install() {
  say "RabbitMQ is not installed: installing it with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server
}

# The tests log in as guest/guest (RabbitMQ allows that user from localhost only). With the
# project's Python at hand, try it, and say what to change if the login is refused.
rabbitmq_prepare() {
  local py=.venv/bin/python
  [ -x "$py" ] && "$py" -c "import pika" 2>/dev/null || return 0
  if ! "$py" - "$AMQP_HOST" "$AMQP_PORT" <<'PY' 2>/dev/null; then
import sys, pika
pika.BlockingConnection(pika.ConnectionParameters(
    sys.argv[1], int(sys.argv[2]), credentials=pika.PlainCredentials("guest", "guest"),
    connection_attempts=1, socket_timeout=5)).close()
PY
    say "RabbitMQ answers, but the login guest/guest on $AMQP_HOST:$AMQP_PORT is refused;"
    say "  the tests need it (or set DELIVERYLAB_AMQP_URL to a user that may declare queues)"
    return 1
  fi
}

# --- NATS with JetStream ------------------------------------------------------------------------
# Up means: a server answers on the port and its INFO line says JetStream is on (a NATS server
# without -js would accept connections, and every stream request would fail).
nats_info() { timeout 2 bash -c "exec 3<>/dev/tcp/$NATS_HOST/$NATS_PORT && head -n1 <&3" 2>/dev/null; }

nats_up() { nats_info | grep -q '"jetstream":true'; }

nats_installed() { [ -x /usr/sbin/nats-server ]; }

nats_start() {
  if port_open "$NATS_HOST" "$NATS_PORT"; then
    say "something answers on $NATS_HOST:$NATS_PORT without JetStream: restart it with -js"
    return 1
  fi
  say "nats-server is installed but not answering on $NATS_HOST:$NATS_PORT: starting it with JetStream"
  as_root mkdir -p /var/lib/nats-server
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a "$NATS_HOST" -p "$NATS_PORT" -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}

nats_install() {
  say "nats-server is not installed: installing it with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
}

# --- Redis (Streams) -----------------------------------------------------------------------------
# Up means: the port answers PING with +PONG (a Redis that is up, not just an open port).
redis_up() {
  port_open "$REDIS_HOST" "$REDIS_PORT" || return 1
  local reply
  reply=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "PING\r\n" >&3
                             head -c 5 <&3' "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null)
  [ "$reply" = "+PONG" ]
}

redis_installed() { command -v redis-server >/dev/null; }

# No persistence, as the tests want it (their streams are throwaway): --save "" and no AOF.
# A deployment that keeps its messages sets appendonly yes (see the lab's Redis page).
redis_start() {
  if port_open "$REDIS_HOST" "$REDIS_PORT"; then
    say "something answers on $REDIS_HOST:$REDIS_PORT that is not Redis: stop it first"
    return 1
  fi
  say "redis-server is installed but not answering on $REDIS_HOST:$REDIS_PORT: starting it"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/deliverylab.log
}

redis_install() {
  say "redis-server is not installed: installing it with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
}

# --- Mosquitto (MQTT) ---------------------------------------------------------------------------
# Up means: the port answers an MQTT 3.1.1 CONNECT with a CONNACK that accepts it (packet type
# 0x20, remaining length 2, return code 0): a broker that is up, not just an open port.
mosquitto_up() {
  port_open "$MQTT_HOST" "$MQTT_PORT" || return 1
  local reply
  reply=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"
    printf "\x10\x16\x00\x04MQTT\x04\x02\x00\x0a\x00\x0adl-service" >&3
    head -c 4 <&3' "$MQTT_HOST" "$MQTT_PORT" 2>/dev/null | od -An -tx1 | tr -d ' \n')
  [[ $reply =~ ^2002..00$ ]]
}

mosquitto_installed() { [ -x /usr/sbin/mosquitto ]; }

mosquitto_start() {
  say "mosquitto is installed but not answering on $MQTT_HOST:$MQTT_PORT: starting it"
  as_root /usr/sbin/mosquitto -d -c /etc/mosquitto/mosquitto.conf
}

mosquitto_install() {
  say "mosquitto is not installed: installing it with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
}

# --- the driver --------------------------------------------------------------------------------
bring_up() {
  local name=$1 rc=0
  if "${name}_up"; then
    say "$name is running"
  else
    if ! "${name}_installed"; then
      "${name}_install" || rc=$?
      if [ "$rc" -eq 99 ]; then
        say "cannot install $name: it needs root or passwordless sudo (apt-get install)"
        return 1
      elif [ "$rc" -ne 0 ]; then say "installing $name failed (exit $rc)"; return 1; fi
    fi
    rc=0; "${name}_start" || rc=$?
    if [ "$rc" -eq 99 ]; then say "cannot start $name: it needs root or passwordless sudo"; return 1; fi
    wait_for "$name" "${name}_up" || return 1
    say "$name started"
  fi
  if declare -F "${name}_prepare" >/dev/null; then "${name}_prepare"; fi
}

main() {
  local names=("$@") failed=0
  [ ${#names[@]} -eq 0 ] && names=("${ALL[@]}")
  for name in "${names[@]}"; do
    if ! declare -F "${name}_up" >/dev/null; then
      say "unknown service '$name' (known: ${ALL[*]})"; exit 2
    fi
    bring_up "$name" || failed=1
  done
  exit "$failed"
}

main "$@"
