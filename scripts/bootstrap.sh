#!/usr/bin/env bash
# Creates (or refreshes) the project virtualenv in .venv and installs the project with its
# dev extras under constraints.txt. Idempotent: re-runs are skipped while nothing changed.
#
#   bash scripts/bootstrap.sh          CPU build of torch (the pin in constraints.txt)
#   bash scripts/bootstrap.sh --cuda   a CUDA build of torch instead: the torch pin is dropped
#                                      and torch comes from ASYNCBALANCE_TORCH_INDEX (default
#                                      https://download.pytorch.org/whl/cu126; pick the index
#                                      matching your driver on pytorch.org); setup fails unless
#                                      the installed torch is a CUDA build. Then
#                                      `.venv/bin/python -m pytest -m cuda` runs the CUDA cases.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
variant=cpu
for arg in "$@"; do
    case "$arg" in
        --cuda) variant=cuda ;;
        --cpu) variant=cpu ;;
        *) echo "bootstrap.sh: unknown option '$arg' (valid choices: --cpu, --cuda)" >&2
           exit 2 ;;
    esac
done
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.asyncbalance-installed
if [ "$variant" = cpu ]; then
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
else
    want=$( (cat pyproject.toml constraints.txt; echo cuda) | sha256sum | cut -d' ' -f1)
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up .venv ($variant torch; the first run takes a few minutes)..." >&2
    log=.venv/install.log
    : >"$log"
    constraints=constraints.txt
    if [ "$variant" = cuda ]; then
        index=${ASYNCBALANCE_TORCH_INDEX:-https://download.pytorch.org/whl/cu126}
        constraints=.venv/constraints-cuda.txt
        grep -v '^torch==' constraints.txt > "$constraints"
        cuda_torch() {
            .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
                2>/dev/null
        }
        if ! cuda_torch; then
            .venv/bin/python -m pip uninstall -y torch >>"$log" 2>&1 || true
            if ! .venv/bin/python -m pip install --index-url "$index" "torch>=2.1" \
                    >>"$log" 2>&1; then
                tail -n 40 "$log" >&2
                echo "setup failed installing torch from $index; the full pip log is in $log" >&2
                exit 1
            fi
        fi
        if ! cuda_torch; then
            echo "setup failed: the torch installed from $index is a CPU build" \
                 "($(.venv/bin/python -W ignore -c 'import torch; print(torch.__version__)' \
                      2>/dev/null));" \
                 "set ASYNCBALANCE_TORCH_INDEX to a CUDA wheel index (pytorch.org)" >&2
            exit 1
        fi
    fi
    if ! .venv/bin/python -m pip install -c "$constraints" -e ".[dev]" >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "setup failed; the full pip log is in $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
