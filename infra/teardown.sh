#!/usr/bin/env bash
# Deletes the stack deploy.sh created (functions, API, table, topic rule,
# roles, log groups). The table's data goes with it.
#
#   infra/teardown.sh [--stack NAME] [--region REGION]
set -euo pipefail
stack="${STACK:-channel-bridge}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
while [ $# -gt 0 ]; do
  case "$1" in
    --stack) stack="$2"; shift 2 ;;
    --region) region="$2"; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "teardown.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v sam >/dev/null || { echo "teardown.sh: sam is missing: pip install aws-sam-cli" >&2; exit 1; }
[ -n "$region" ] || region="$(aws configure get region || true)"
sam delete --stack-name "$stack" --region "$region" --no-prompts
rm -rf "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/build"
echo "deleted stack $stack in $region"
