#!/usr/bin/env bash
# Deploys the channel bridge to AWS: builds the three Lambda functions with
# cargo lambda, then `sam deploy`s infra/template.yaml, and prints the wss:// URL.
#
#   infra/deploy.sh [--stack NAME] [--region REGION] [--arch arm64|x86_64]
#                   [--no-auth] [--jwks-url URL] [--topic-filter FILTER] [--topic-prefix PREFIX]
#                   [-- extra sam deploy --parameter-overrides KEY=VALUE ...]
#
# Needs: cargo + cargo-lambda (pip install cargo-lambda), the AWS SAM CLI
# (pip install aws-sam-cli), the AWS CLI, and AWS credentials.
# Auth: HS256 with $BRIDGE_JWT_SECRET (generated once into infra/.jwt-secret
# when unset), or RS256/ES256 with --jwks-url (e.g. a Cognito user pool), or
# --no-auth. Tear down with infra/teardown.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
stack="${STACK:-channel-bridge}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
arch="arm64"
auth="token"
jwks_url="${BRIDGE_JWKS_URL:-}"
topic_filter="#"
topic_prefix=""
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --stack) stack="$2"; shift 2 ;;
    --region) region="$2"; shift 2 ;;
    --arch) arch="$2"; shift 2 ;;
    --no-auth) auth="off"; shift ;;
    --jwks-url) jwks_url="$2"; shift 2 ;;
    --topic-filter) topic_filter="$2"; shift 2 ;;
    --topic-prefix) topic_prefix="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "deploy.sh: $1 is missing: $2" >&2
    exit 1
  fi
}
need cargo "install Rust from https://rustup.rs"
need aws "install the AWS CLI v2"
need sam "pip install aws-sam-cli"
cargo lambda --version >/dev/null 2>&1 || { echo "deploy.sh: cargo-lambda is missing: pip install cargo-lambda" >&2; exit 1; }
[ -n "$region" ] || region="$(aws configure get region || true)"
[ -n "$region" ] || { echo "deploy.sh: no region: pass --region or set AWS_REGION" >&2; exit 1; }

case "$arch" in
  arm64) target_flag="--arm64" ;;
  x86_64) target_flag="--x86-64" ;;
  *) echo "deploy.sh: --arch is arm64 or x86_64" >&2; exit 2 ;;
esac

echo "==> building the functions ($arch)"
(cd "$root" && cargo lambda build --release "$target_flag" --package lambdas \
  --bin ws-handler --bin ws-authorizer --bin iot-fanout --lambda-dir "$here/build")

echo "==> looking up this account's IoT data endpoint"
iot_endpoint="$(aws iot describe-endpoint --endpoint-type iot:Data-ATS --region "$region" \
  --query endpointAddress --output text)"

# Access logs of WebSocket APIs need the account's API Gateway CloudWatch role.
cw_role="$(aws apigateway get-account --region "$region" --query cloudwatchRoleArn --output text 2>/dev/null || true)"
set_role="false"
if [ -z "$cw_role" ] || [ "$cw_role" = "None" ]; then set_role="true"; fi

params=(
  "Architecture=$arch"
  "AuthMode=$auth"
  "TopicFilter=$topic_filter"
  "TopicPrefix=$topic_prefix"
  "IotDataEndpoint=$iot_endpoint"
  "SetApiGatewayCloudWatchRole=$set_role"
)
if [ "$auth" = "token" ]; then
  if [ -n "$jwks_url" ]; then
    params+=("JwksUrl=$jwks_url")
  else
    secret_file="$here/.jwt-secret"
    if [ -z "${BRIDGE_JWT_SECRET:-}" ]; then
      if [ ! -s "$secret_file" ]; then
        (umask 077; openssl rand -hex 32 > "$secret_file")
        echo "==> generated an HS256 secret in $secret_file"
      fi
      BRIDGE_JWT_SECRET="$(cat "$secret_file")"
    fi
    params+=("JwtSecret=$BRIDGE_JWT_SECRET")
  fi
fi

echo "==> deploying stack $stack to $region"
sam deploy \
  --template-file "$here/template.yaml" \
  --stack-name "$stack" \
  --region "$region" \
  --capabilities CAPABILITY_IAM \
  --resolve-s3 \
  --no-confirm-changeset \
  --no-fail-on-empty-changeset \
  --parameter-overrides "${params[@]}" "${extra[@]}"

output() {
  aws cloudformation describe-stacks --stack-name "$stack" --region "$region" \
    --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text
}
api_id="$(output WebSocketApiId)"
stage="$(output StageName)"
# CloudFormation does not redeploy a WebSocket API when only its routes
# changed: deploy the stage explicitly so it always serves the template.
aws apigatewayv2 create-deployment --api-id "$api_id" --stage-name "$stage" --region "$region" \
  --description "deploy.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)" >/dev/null

url="$(output WebSocketUrl)"
echo
echo "WebSocket URL: $url"
if [ "$auth" = "token" ] && [ -z "$jwks_url" ]; then
  echo "A token for it:  infra/token.sh user-1 'demo/#' 'demo/#'"
  echo "Then:            bridge sub \"$url?token=\$TOKEN\" 'demo/#'"
fi
