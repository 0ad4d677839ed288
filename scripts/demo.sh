#!/usr/bin/env bash
# Set everything up, then replay the bundled real traces through the daemon's own
# control step on a simulated host and print the scorecard.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/overcommitd replay "$@"
