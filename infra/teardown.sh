#!/usr/bin/env bash
# Deletes the stack deploy.sh created (functions, API, table, topic rule,
# roles, log groups, alarms). The table's data goes with it.
#
#   infra/teardown.sh [--stack NAME] [--region REGION]
#
# One thing stays: the account's API Gateway CloudWatch role, when this stack
# created it (the template retains it). The account's logging setting points
# at it and deleting the stack does not reset that setting, so deleting the
# role would stop the access logs of every API in this account and region.
set -euo pipefail
stack="${STACK:-channel-bridge}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
while [ $# -gt 0 ]; do
  case "$1" in
    --stack|--region)
      [ $# -ge 2 ] || { echo "teardown.sh: $1 needs a value" >&2; exit 2; }
      if [ "$1" = "--stack" ]; then stack="$2"; else region="$2"; fi
      shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "teardown.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v sam >/dev/null || { echo "teardown.sh: sam is missing: pip install aws-sam-cli" >&2; exit 1; }
command -v aws >/dev/null || { echo "teardown.sh: aws is missing: install the AWS CLI v2" >&2; exit 1; }
[ -n "$region" ] || region="$(aws configure get region || true)"
[ -n "$region" ] || { echo "teardown.sh: no region: pass --region or set AWS_REGION" >&2; exit 1; }

# The logging role this stack created, if any (it outlives the stack).
role="$(aws cloudformation describe-stack-resource --stack-name "$stack" --region "$region" \
  --logical-resource-id ApiGatewayCloudWatchRole \
  --query StackResourceDetail.PhysicalResourceId --output text 2>/dev/null || true)"

sam delete --stack-name "$stack" --region "$region" --no-prompts
rm -rf "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/build"
echo "deleted stack $stack in $region"
if [ -n "$role" ] && [ "$role" != "None" ]; then
  echo "kept IAM role $role: the account's API Gateway CloudWatch role in $region,"
  echo "which access logging of every API there uses. Delete it only once no API in the"
  echo "account logs through it (aws apigateway get-account --region $region)."
fi
