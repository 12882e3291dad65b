#!/bin/bash
# Makes the venv the OTLP tests run their receiver with (receiver.py needs opentelemetry-proto
# from PyPI): .build-otlp/venv, with requirements.txt pinned, rebuilt when that file changes.
# `make test` runs it; needs python3 with venv (Debian: python3-venv) and PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=$root/.build-otlp/venv
if ! cmp -s "$here/requirements.txt" "$venv/requirements.txt" 2>/dev/null; then
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/requirements.txt"
fi
"$venv/bin/python" -c "from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2"
echo "OTLP receiver venv ready: $venv"
