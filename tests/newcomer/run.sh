#!/usr/bin/env bash
# The first ten minutes, as a newcomer lives them: a fresh clone of this repository, a fresh venv, `pip install .`
# (not editable) in the clone's own directory, `rkllm-mqtt serve` on its embedded defaults (port 1883), then the
# README's tour exactly as written, checking every answer, and `doctor` agreeing with `serve`.
#
# Usage: tests/newcomer/run.sh [REPOSITORY]   (default: the repository this script is in; its HEAD is cloned,
# so commit first). Needs python3 (with venv), a C compiler, git, mosquitto-clients and jq, and port 1883 free.
# Prints PASS/FAIL per step and a summary; exits 1 when any step fails, 2 when it cannot run at all.
set -uo pipefail

repository="${1:-$(cd "$(dirname "$0")/../.." && pwd)}"
python="${PYTHON:-python3}"
port=1883
work="$(mktemp -d)"
serve_pid=""
passed=0
failed=0

note() { printf '== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$1"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$1"; [ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/      /'; failed=$((failed + 1)); }

cleanup() {
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
    kill -TERM "$serve_pid" 2>/dev/null
    wait "$serve_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

for tool in git "$python" cc mosquitto_pub mosquitto_sub jq; do
  command -v "$tool" >/dev/null 2>&1 || { echo "newcomer: $tool is missing" >&2; exit 2; }
done
# The README's commands use the default port: refuse clearly rather than test against someone else's broker.
if ! "$python" -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $port))" 2>/dev/null; then
  echo "newcomer: port $port on 127.0.0.1 is taken (another MQTT broker?); the README's tour needs it free" >&2
  exit 2
fi

started=$(date +%s)
note "clone $repository into a fresh directory"
git clone --quiet "$repository" "$work/rkllm-mqtt" || { echo "newcomer: git clone failed" >&2; exit 2; }
cd "$work/rkllm-mqtt" || exit 2
unset $(env | grep -o '^RKLLM_MQTT_[^=]*') 2>/dev/null || true

note "fresh venv; pip install . in the clone's own directory"
"$python" -m venv "$work/venv" || { echo "newcomer: cannot create a venv" >&2; exit 2; }
export PATH="$work/venv/bin:$PATH"
if pip install --quiet --disable-pip-version-check . >"$work/pip.log" 2>&1; then
  pass "pip install . (non-editable) in the clone"
else
  fail "pip install . (non-editable) in the clone" "$(tail -n 20 "$work/pip.log")"
  echo "SUMMARY: FAIL ($passed passed, $failed failed)"
  exit 1
fi

note "rkllm-mqtt serve & (embedded broker, simulated runtime), from the clone's directory"
rkllm-mqtt serve >"$work/serve.log" 2>&1 &
serve_pid=$!
ready=""
for _ in $(seq 1 600); do  # up to 60 s: the log's "ready" event, or serve exiting
  if grep -q '"event": "ready"' "$work/serve.log"; then ready=yes; break; fi
  kill -0 "$serve_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$ready" ] && ! kill -0 "$serve_pid" 2>/dev/null; then
  wait "$serve_pid"; code=$?
  serve_pid=""
  if [ "$code" -eq 4 ]; then  # exit code 4: the embedded broker could not start
    echo "newcomer: serve could not start its broker: port $port was taken after the check (another broker?)" >&2
    grep -m 1 embedded_broker_failed "$work/serve.log" >&2
    exit 2
  fi
fi
serve_runtime=no
if [ -n "$ready" ] && grep '"event": "ready"' "$work/serve.log" | grep -q '"runtime": "ready"'; then
  serve_runtime=yes
  pass "serve is ready with its runtime loaded"
else
  fail "serve is ready with its runtime loaded" "$(tail -n 15 "$work/serve.log")"
fi
if grep -q '"event": "homeassistant_discovery_off"' "$work/serve.log"; then
  pass "serve's log says why Home Assistant discovery is off on the embedded broker"
else
  fail "serve's log says why Home Assistant discovery is off on the embedded broker"
fi

node=$(rkllm-mqtt check-config 2>/dev/null | jq -r .mqtt.node_id)
if [ -n "$node" ] && [ "$node" != "null" ]; then
  pass "rkllm-mqtt check-config | jq -r .mqtt.node_id prints the node id ($node)"
else
  fail "rkllm-mqtt check-config | jq -r .mqtt.node_id prints the node id"
  node=$(hostname)
fi

note 'rkllm-mqtt ask "What is an NPU?"'
out=$(rkllm-mqtt ask "What is an NPU?" 2>"$work/ask.err"); rc=$?
if [ "$rc" -eq 0 ] && [[ "$out" == *"You said: What is an NPU?."* ]]; then
  pass "ask streams the answer and exits 0"
else
  fail "ask streams the answer and exits 0" "rc=$rc stdout=$out stderr=$(cat "$work/ask.err")"
fi

note 'rkllm-mqtt ask --json "Hello"'
out=$(rkllm-mqtt ask --json "Hello" 2>"$work/ask.err"); rc=$?
if [ "$rc" -eq 0 ] && printf '%s' "$out" | jq -e '.state == "done" and (.text | contains("You said: Hello."))' >/dev/null; then
  pass "ask --json prints the final response object"
else
  fail "ask --json prints the final response object" "rc=$rc stdout=$out stderr=$(cat "$work/ask.err")"
fi

note "mosquitto_sub -t 'rkllm/$node/response/+' -R -C 1 & then mosquitto_pub -t rkllm/$node/prompt -m '...' (QoS 0)"
mosquitto_sub -t "rkllm/$node/response/+" -R -C 1 -W 60 >"$work/sub1.out" 2>&1 &
sub=$!
mosquitto_pub -t "rkllm/$node/prompt" -m 'Turn this into a haiku: the kettle boiled'
wait "$sub"
if jq -e '.state == "done" and (.text | contains("kettle boiled"))' "$work/sub1.out" >/dev/null 2>&1; then
  pass "a plain-text prompt published without -q is answered on rkllm/<node>/response/<id>"
else
  fail "a plain-text prompt published without -q is answered on rkllm/<node>/response/<id>" "$(cat "$work/sub1.out")"
fi

note "mosquitto_pub a JSON prompt with id q1, then mosquitto_sub -t 'rkllm/$node/response/q1' -C 1 | jq -r .text"
mosquitto_pub -t "rkllm/$node/prompt" -m '{"id": "q1", "prompt": "Write a haiku about rain."}'
mosquitto_sub -t "rkllm/$node/response/q1" -C 1 -W 60 2>&1 | jq -r .text >"$work/sub2.out" 2>&1
if grep -q "You said: Write a haiku about rain." "$work/sub2.out"; then
  pass "the answer to id q1 is on rkllm/<node>/response/q1, also for a subscriber that comes after asking"
else
  fail "the answer to id q1 is on rkllm/<node>/response/q1, also for a subscriber that comes after asking" \
    "$(cat "$work/sub2.out")"
fi

note "mosquitto_pub -t rkllm/$node/abort -n while a request runs (docs/iot-devices.md)"
rkllm-mqtt ask --json "Tell me a long story." >"$work/abort.out" 2>"$work/abort.err" &
asker=$!
busy=""
for _ in $(seq 1 100); do
  state=$(mosquitto_sub -t "rkllm/$node/state" -C 1 -W 2 2>/dev/null | jq -r .status 2>/dev/null)
  if [ "$state" = "busy" ]; then busy=yes; break; fi
  kill -0 "$asker" 2>/dev/null || break
done
[ -n "$busy" ] && mosquitto_pub -t "rkllm/$node/abort" -n
wait "$asker"; rc=$?
if [ -n "$busy" ] && [ "$rc" -eq 5 ] && jq -e '.state == "aborted"' "$work/abort.out" >/dev/null 2>&1; then
  pass "an empty abort published without -q aborts the running request (ask exits 5)"
else
  fail "an empty abort published without -q aborts the running request (ask exits 5)" \
    "busy=${busy:-no} rc=$rc stdout=$(cat "$work/abort.out") stderr=$(cat "$work/abort.err")"
fi

note "rkllm-mqtt doctor, in the clone's directory, while serve runs"
rkllm-mqtt doctor >"$work/doctor.out" 2>&1; rc=$?
doctor_runtime=no
grep -q '^PASS  runtime library: sim' "$work/doctor.out" && doctor_runtime=yes
if [ "$doctor_runtime" = yes ] && [ "$serve_runtime" = yes ]; then
  pass "doctor and serve agree: the simulated runtime library loads"
else
  fail "doctor and serve agree: the simulated runtime library loads" \
    "serve's runtime ready: $serve_runtime; doctor's runtime library PASS: $doctor_runtime"$'\n'"$(cat "$work/doctor.out")"
fi
if grep -q "^PASS  broker: 127.0.0.1:$port is the embedded broker of the rkllm-mqtt serve already running" "$work/doctor.out"; then
  pass "doctor recognises serve's own embedded broker"
else
  fail "doctor recognises serve's own embedded broker" "$(cat "$work/doctor.out")"
fi
if [ "$rc" -eq 0 ] && ! grep -q "run as root" "$work/doctor.out"; then
  pass "doctor exits 0 with no hint that does not apply"
else
  fail "doctor exits 0 with no hint that does not apply" "rc=$rc $(cat "$work/doctor.out")"
fi

note "stop serve"
kill -TERM "$serve_pid"; wait "$serve_pid"; rc=$?
serve_pid=""
if [ "$rc" -eq 0 ] && ! grep -q '"not_ready"' "$work/serve.log"; then
  pass "serve stops cleanly on SIGTERM and never answered not_ready"
else
  fail "serve stops cleanly on SIGTERM and never answered not_ready" "rc=$rc $(grep -m 5 -E 'not_ready|error' "$work/serve.log")"
fi

elapsed=$(( $(date +%s) - started ))
if [ "$failed" -eq 0 ]; then
  echo "SUMMARY: PASS ($passed steps in ${elapsed} s)"
  exit 0
fi
echo "SUMMARY: FAIL ($failed of $((passed + failed)) steps failed, ${elapsed} s)"
exit 1
