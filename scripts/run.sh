#!/usr/bin/env bash
# Sets up the project virtualenv and runs the main job on its embedded default.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
mkdir -p runs
exec .venv/bin/asyncbalance balance asyncbalance/data/example_mlp.npz --p 1 \
    -o runs/example_mlp.balanced.npz --report runs/example_mlp.report.json "$@"
