#!/usr/bin/env bash
# Sets up the project virtualenv and runs the main job: the quickstart scenario, a
# 384-neuron MLP balanced by Ray shard actors over delayed links (a local Ray is started by
# the program itself; set RAY_ADDRESS or pass --address to use a cluster).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
exec .venv/bin/asyncbalance run scenarios/quickstart.toml "$@"
