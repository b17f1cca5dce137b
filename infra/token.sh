#!/usr/bin/env bash
# Mints an HS256 token for the deployed bridge with the secret deploy.sh used
# ($BRIDGE_JWT_SECRET, else infra/.jwt-secret). Needs only openssl.
#
#   infra/token.sh SUBJECT [SUBSCRIBE_FILTERS] [PUBLISH_FILTERS] [TTL_SECONDS]
#   infra/token.sh user-1 'fleet/+/telemetry,users/{sub}/#' 'fleet/+/commands' 3600
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
sub="$1"; subscribe="${2:-}"; publish="${3:-}"; ttl="${4:-3600}"
secret="${BRIDGE_JWT_SECRET:-$(cat "$here/.jwt-secret" 2>/dev/null || true)}"
[ -n "$secret" ] || { echo "token.sh: no secret: set BRIDGE_JWT_SECRET or run deploy.sh first" >&2; exit 1; }
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
json_list() {
  local IFS=','; local out=""; local f
  for f in $1; do out="$out${out:+,}$(json_str "$f")"; done
  printf '[%s]' "$out"
}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
exp=$(( $(date +%s) + ttl ))
header='{"alg":"HS256","typ":"JWT"}'
payload="{\"sub\":$(json_str "$sub"),\"exp\":$exp,\"channels\":{\"subscribe\":$(json_list "$subscribe"),\"publish\":$(json_list "$publish")}}"
unsigned="$(printf '%s' "$header" | b64url).$(printf '%s' "$payload" | b64url)"
sig="$(printf '%s' "$unsigned" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)"
printf '%s.%s\n' "$unsigned" "$sig"
