#!/usr/bin/env bash
# Creates (or refreshes) the project virtualenv in .venv and installs the project with its
# dev extras under constraints.txt. Idempotent: re-runs are skipped while nothing changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.asyncbalance-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up .venv (first run takes a few minutes)..." >&2
    log=.venv/install.log
    if ! .venv/bin/python -m pip install -c constraints.txt -e ".[dev]" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "setup failed; the full pip log is in $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
