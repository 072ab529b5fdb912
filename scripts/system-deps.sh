#!/usr/bin/env bash
# System packages the test suite needs beyond .venv: installed here so a fresh machine needs nothing by
# hand. Idempotent: does nothing when they are already present.
set -euo pipefail
need=()
# (filled in as features need them: chromium for the web page tests, postgresql for the commons)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
