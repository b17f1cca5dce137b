#!/usr/bin/env bash
# Deploys the channel bridge to AWS: builds the three Lambda functions with
# cargo lambda, then `sam deploy`s infra/template.yaml, and prints the wss:// URL.
#
#   infra/deploy.sh [--stack NAME] [--region REGION] [--arch arm64|x86_64]
#                   [--no-auth] [--jwks-url URL] [--jwt-issuer ISS] [--jwt-audience AUD]
#                   [--jwt-leeway SECONDS] [--topic-filter FILTER] [--topic-prefix PREFIX]
#                   [-- extra sam deploy --parameter-overrides KEY=VALUE ...]
#
# Needs: cargo + cargo-lambda (pip install cargo-lambda), the AWS SAM CLI
# (pip install aws-sam-cli), the AWS CLI, and AWS credentials.
# Auth: HS256 with $BRIDGE_JWT_SECRET (generated once into infra/.jwt-secret
# when unset), or RS256/ES256 with --jwks-url (e.g. a Cognito user pool), or
# --no-auth. Every run passes every auth setting. Tear down with infra/teardown.sh.
#
# Written for bash 3.2 (macOS) as well as bash 5: no associative arrays, no
# mapfile, and empty arrays expanded as ${a[@]+"${a[@]}"} under `set -u`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
stack="${STACK:-channel-bridge}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
arch="arm64"
auth="token"
jwks_url="${BRIDGE_JWKS_URL:-}"
jwt_issuer="${BRIDGE_JWT_ISSUER:-}"
jwt_audience="${BRIDGE_JWT_AUDIENCE:-}"
jwt_leeway="${BRIDGE_JWT_LEEWAY:-0}"
topic_filter="#"
topic_prefix=""
extra=()

usage() { sed -n '2,18p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --stack|--region|--arch|--jwks-url|--jwt-issuer|--jwt-audience|--jwt-leeway|--topic-filter|--topic-prefix)
      [ $# -ge 2 ] || { echo "deploy.sh: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in
        --stack) stack="$2" ;;
        --region) region="$2" ;;
        --arch) arch="$2" ;;
        --jwks-url) jwks_url="$2" ;;
        --jwt-issuer) jwt_issuer="$2" ;;
        --jwt-audience) jwt_audience="$2" ;;
        --jwt-leeway) jwt_leeway="$2" ;;
        --topic-filter) topic_filter="$2" ;;
        --topic-prefix) topic_prefix="$2" ;;
      esac
      shift 2 ;;
    --no-auth) auth="off"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The auth settings are passed on every run (below), so they cannot come
# after `--` as well; a secret never goes on a command line of ours.
for kv in ${extra[@]+"${extra[@]}"}; do
  case "${kv%%=*}" in
    AuthMode|JwtSecret|JwksUrl|JwtIssuer|JwtAudience|JwtLeeway|SetApiGatewayCloudWatchRole)
      echo "deploy.sh: pass ${kv%%=*} with deploy.sh's options (or \$BRIDGE_JWT_SECRET), not after --" >&2
      exit 2 ;;
  esac
done
case "$jwt_leeway" in
  ''|*[!0-9]*) echo "deploy.sh: --jwt-leeway is a number of seconds" >&2; exit 2 ;;
esac

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

# The auth settings, all of them on every run: `sam deploy` keeps a
# parameter's previous value when it is not passed, so switching from a
# secret to --jwks-url must empty the secret (and the other way round).
jwt_secret=""
if [ "$auth" = "token" ] && [ -z "$jwks_url" ]; then
  jwt_secret="${BRIDGE_JWT_SECRET:-}"
  if [ -z "$jwt_secret" ]; then
    secret_file="$here/.jwt-secret"
    if [ ! -s "$secret_file" ]; then
      (umask 077; openssl rand -hex 32 > "$secret_file")
      echo "==> generated an HS256 secret in $secret_file"
    fi
    jwt_secret="$(cat "$secret_file")"
  fi
  # The functions refuse a shorter HS256 key (RFC 7518 3.2) at start, which
  # would fail every $connect: refuse it here, before anything is deployed.
  if [ "${#jwt_secret}" -lt 32 ]; then
    echo "deploy.sh: BRIDGE_JWT_SECRET is ${#jwt_secret} bytes; HS256 needs at least 32 (openssl rand -hex 32)" >&2
    exit 2
  fi
fi
if [ "$auth" = "off" ]; then jwks_url=""; fi

echo "==> building the functions ($arch, profile lambda)"
# Without the default feature `local` (aws-local's dependencies): its tokio
# and hyper features would otherwise be unified into the functions.
(cd "$root" && cargo lambda build --profile lambda "$target_flag" --package lambdas \
  --no-default-features --bin ws-handler --bin ws-authorizer --bin iot-fanout \
  --lambda-dir "$here/build")

echo "==> looking up this account's IoT data endpoint"
iot_endpoint="$(aws iot describe-endpoint --endpoint-type iot:Data-ATS --region "$region" \
  --query endpointAddress --output text)"

# Access logs of WebSocket APIs need the account's API Gateway CloudWatch
# role. This stack creates it when the account has none, and keeps it on
# every later deploy: the account then points at that role, and flipping the
# parameter back to false would remove it from the stack (the template
# retains the role even so, but the stack would no longer manage it).
# A parameter of the deployed stack; nothing when there is no stack yet.
stack_param() {
  local out err status=0
  err="$(mktemp)"
  out="$(aws cloudformation describe-stacks --stack-name "$stack" --region "$region" \
    --query "Stacks[0].Parameters[?ParameterKey=='$1'].ParameterValue" --output text 2>"$err")" || status=$?
  if [ "$status" -eq 0 ]; then
    printf '%s\n' "$out"
  elif grep -q "does not exist" "$err"; then
    status=0
  else
    echo "deploy.sh: cannot read stack $stack: $(cat "$err")" >&2
  fi
  rm -f "$err"
  return "$status"
}
previous_set_role="$(stack_param SetApiGatewayCloudWatchRole)"
set_role="false"
if [ "$previous_set_role" = "true" ]; then
  set_role="true"
else
  cw_role="$(aws apigateway get-account --region "$region" --query cloudwatchRoleArn --output text 2>/dev/null || true)"
  if [ -z "$cw_role" ] || [ "$cw_role" = "None" ]; then set_role="true"; fi
fi

# One KEY="VALUE" item as `sam deploy --parameter-overrides` reads it: the
# value in double quotes, so an empty value ("") or one with spaces passes
# whole; `"` is escaped; sam has no way to pass a backslash through.
params=()
param() {
  case "$2" in
    *\\*) echo "deploy.sh: the value of $1 contains a backslash, which sam deploy cannot pass" >&2; exit 2 ;;
  esac
  params+=("$1=\"$(printf '%s' "$2" | sed 's/"/\\"/g')\"")
}
param Architecture "$arch"
param AuthMode "$auth"
param JwtSecret "$jwt_secret"
param JwksUrl "$jwks_url"
param JwtIssuer "$jwt_issuer"
param JwtAudience "$jwt_audience"
param JwtLeeway "$jwt_leeway"
param TopicFilter "$topic_filter"
param TopicPrefix "$topic_prefix"
param IotDataEndpoint "$iot_endpoint"
param SetApiGatewayCloudWatchRole "$set_role"

# The parameters reach sam in a file only this user can read, never on its
# command line, where `ps` shows them to everyone on the machine: the HS256
# secret is one of them. (sam reads `parameter_overrides` from a config file
# as it reads the flag's items.)
cfg_dir="$(mktemp -d)"
trap 'rm -rf "$cfg_dir"' EXIT
cfg="$cfg_dir/samconfig.toml"
(
  umask 077
  {
    echo 'version = 0.1'
    echo '[bridge.deploy.parameters]'
    printf 'parameter_overrides = ['
    sep=''
    for item in ${params[@]+"${params[@]}"} ${extra[@]+"${extra[@]}"}; do
      # A TOML basic string: backslashes and quotes escaped.
      printf '%s"%s"' "$sep" "$(printf '%s' "$item" | sed 's/\\/\\\\/g; s/"/\\"/g')"
      sep=', '
    done
    echo ']'
  } > "$cfg"
)

echo "==> deploying stack $stack to $region"
sam deploy \
  --config-file "$cfg" \
  --config-env bridge \
  --template-file "$here/template.yaml" \
  --stack-name "$stack" \
  --region "$region" \
  --capabilities CAPABILITY_IAM \
  --resolve-s3 \
  --no-confirm-changeset \
  --no-fail-on-empty-changeset

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
if [ -n "$jwt_secret" ]; then
  echo "A token for it:  infra/token.sh user-1 'demo/#' 'demo/#'"
  echo "Then:            bridge sub \"$url?token=\$TOKEN\" 'demo/#'"
fi
