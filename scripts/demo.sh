#!/usr/bin/env bash
# The main job on an example: validate a policy, then ask it about requests an agent might make.
set -uo pipefail
cd "$(dirname "$0")/.."
EL=.venv/bin/egresslock
POLICY=examples/basic.yaml
$EL policy validate "$POLICY" || exit 1
ask() { echo "\$ egresslock check -p $POLICY $*"; $EL check -p "$POLICY" "$@"; echo "(exit $?)"; echo; }
ask -X GET  https://api.github.com/repos/acme/widgets/issues
ask -X POST https://api.github.com/repos/acme/widgets/issues
ask 'https://api.github.com/repos/acme/widgets/contents?ref=main&d=c2VjcmV0'
ask http://169.254.169.254/latest/meta-data/
ask https://attacker.example/exfil?q=secret
exit 0
