#!/usr/bin/env bash
# Installs what the test suite needs on a Debian/Ubuntu machine (run as root,
# or with sudo available): Mosquitto and its command-line clients (the
# reference external broker; tests start their own on free ports), openssl
# (test keys), Chromium (a real browser runs web/channels.js), and the Python tools for the AWS tests (moto's server for
# DynamoDB, cfn-lint, checkov in its own venv).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients openssl ca-certificates python3-venv chromium >/dev/null

# Python tools live in a venv of the repository's own (.venv, git-ignored),
# so nothing is installed into the system Python.
here="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
"$here/.venv/bin/pip" install -q 'moto[server]==5.*' 'cfn-lint==1.*'
# checkov pins an older boto3: its own venv.
python3 -m venv "$here/.venv-checkov"
"$here/.venv-checkov/bin/pip" install -q 'checkov==3.*'

echo "test dependencies installed: $(mosquitto -h 2>&1 | head -1)"
