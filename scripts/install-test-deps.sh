#!/usr/bin/env bash
# Installs what the test suite needs on a Debian/Ubuntu machine (run as root,
# or with sudo available): Mosquitto and its command-line clients (the
# reference external broker; tests start their own on free ports), RabbitMQ
# (its MQTT plugin is the second external broker; tests start their own
# node, not the system service), openssl
# (test keys and certificates), Chromium (a real browser runs
# web/channels.js), shellcheck (the infra/ scripts), and the Python tools for
# the AWS tests.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients openssl ca-certificates python3-venv chromium shellcheck rabbitmq-server >/dev/null

# Python tools for the AWS tests: moto's server (DynamoDB) and cfn-lint into
# the machine's Python (their commands must be on PATH), checkov in a venv of
# its own (it pins an older boto3). The tests look for checkov at
# /opt/checkov-venv/bin/checkov unless CHECKOV names another.
python3 -m pip install -q --disable-pip-version-check 'moto[server]==5.*' 'cfn-lint==1.*'
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
CHECKOV_VENV="${CHECKOV_VENV:-/opt/checkov-venv}"
$SUDO python3 -m venv "$CHECKOV_VENV"
$SUDO "$CHECKOV_VENV/bin/pip" install -q --disable-pip-version-check 'checkov==3.*'

for tool in mosquitto mosquitto_pub /usr/lib/rabbitmq/bin/rabbitmq-server epmd openssl chromium shellcheck moto_server cfn-lint "$CHECKOV_VENV/bin/checkov"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing after install: $tool" >&2; exit 1; }
done
echo "test dependencies installed"
