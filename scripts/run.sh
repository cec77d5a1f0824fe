#!/usr/bin/env bash
# `make run`: run the agent on its bundled default (demo clip or first camera, BlazeFace, local broker).
# Starts a private mosquitto when nothing listens on the configured broker port of this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
CONFIG="${CONFIG:-config/agent.yaml}"
export EDGE_AGENT_CONFIG="$CONFIG"
# The bundled config keeps state in /var/lib/edge-agent (the service's StateDirectory). The demo keeps its
# own in the checkout, root or not: a clone's demo never shares a model store with another, or with the
# service, and `make clean` removes it.
export EDGE_AGENT__STATE_DIR="${EDGE_AGENT__STATE_DIR:-$PWD/.state}"

read -r URL HOST PORT PREFIX DEVICE < <("$VENV/bin/python" - <<'PY'
from agent.config import load_config
from agent.messaging.link import parse_url
c = load_config()
e = parse_url(c.mqtt.url)
print(c.mqtt.url, e.host, e.port, c.mqtt.prefix, c.device_id)
PY
)

listening() { "$VENV/bin/python" -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('$HOST', $PORT)))"; }
broker_pid=""
if ! listening; then
  case "$HOST" in
    127.*|localhost|::1)
      MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
      conf="$(mktemp)"
      printf 'listener %s %s\nallow_anonymous true\npersistence false\n' "$PORT" "$HOST" > "$conf"
      # its own session: Ctrl-C reaches the agent, which says goodbye before the trap stops the broker
      setsid "$MOSQ" -c "$conf" >/dev/null 2>&1 &
      broker_pid=$!
      trap 'kill $broker_pid 2>/dev/null || true; rm -f "$conf"' EXIT
      for _ in $(seq 50); do listening && break; sleep 0.1; done
      echo "run: started a local mosquitto on $HOST:$PORT (stops with the agent)"
      ;;
    *) echo "run: nothing answers at $URL; the agent will keep retrying in the background" ;;
  esac
fi

cat <<MSG
run: predictions go to $PREFIX/$DEVICE/predictions on $URL (health: $PREFIX/$DEVICE/health, status: $PREFIX/$DEVICE/status)
run: watch them from another terminal with:
       $VENV/bin/agent-ctl watch          (or: mosquitto_sub -h $HOST -p $PORT -t '$PREFIX/#' -v)
       $VENV/bin/agent-ctl status
run: state (model store, outbox, journal) in $EDGE_AGENT__STATE_DIR
run: Ctrl-C stops the agent.
MSG
"$VENV/bin/edge-agent" --config "$CONFIG"
