#!/usr/bin/env bash
# The OpenAI-compatible server's tests (samples/server), after ci/jvm-test.sh has installed the SDK:
#   1. `mvn package` of samples/server: its JUnit 5 suite (OpenAI Java SDK and LangChain4j clients,
#      every invalid input, lifecycle, template injection, the bounded load test) and the runnable jar;
#   2. the README's command: the jar on a free loopback port, /health until ready, one chat request
#      and one streamed completion, then a clean stop.
# Knobs: MVN_OFFLINE=1 adds -o (a warm ~/.m2); DBRX_SERVER_LOADTEST=0 skips the load test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mvn_flags=(-B)
[ "${MVN_OFFLINE:-0}" = 1 ] && mvn_flags+=(-o)
[ "${DBRX_SERVER_LOADTEST:-1}" = 0 ] && mvn_flags+=(-Ddbrx.server.loadtest=false)

echo "== server-test: mvn package (JUnit, load test, runnable jar)"
mvn "${mvn_flags[@]}" -f samples/server/pom.xml package

echo "== server-test: the runnable jar"
jar=samples/server/target/dbrx4j-server-0.1.0-SNAPSHOT-all.jar
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
java -jar "$jar" --model-dir models/tiny-dbrx-cl100k --port "$port" --api-key ci-key --threads 2 >"$log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 1 240); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/health" || true)" = 200 ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "server-test: the server exited"; exit 1; }
  sleep 0.5
done
python3 - "$base" <<'PY'
import json, sys, urllib.request, urllib.error
base = sys.argv[1]
def post(path, body, key="ci-key"):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return urllib.request.urlopen(req, timeout=60)
r = json.load(post("/v1/chat/completions", {"model": "tiny-dbrx-cl100k", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
assert r["object"] == "chat.completion" and r["usage"]["completion_tokens"] == 4, r
events = [l[6:] for l in post("/v1/completions", {"model": "tiny-dbrx-cl100k", "prompt": "hi", "max_tokens": 3, "stream": True}).read().decode().splitlines() if l.startswith("data: ")]
assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length", events
try:
    post("/v1/completions", {"model": "tiny-dbrx-cl100k", "prompt": "hi"}, key="wrong")
    raise AssertionError("a wrong key was accepted")
except urllib.error.HTTPError as e:
    assert e.code == 401 and "error" in json.load(e), e
print("server-test: runnable jar answers chat, streamed completions and 401")
PY
grep -q 'POST /v1/chat/completions 200' "$log" || { cat "$log"; echo "server-test: no request log line"; exit 1; }
echo "server-test: OK"
