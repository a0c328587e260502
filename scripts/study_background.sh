#!/usr/bin/env bash
# Run the claims study unattended and commit each finished record as it lands.
#
#   bash scripts/study_background.sh                 # the cpu budget of studies/paper_claims.toml
#   BUDGET=full bash scripts/study_background.sh --device cuda
#   nohup bash scripts/study_background.sh > /tmp/study.log 2>&1 &
#
# Resumable: `asyncbalance study run` skips every run whose record exists with the current
# configuration, so the script can be stopped (Ctrl-C or kill -TERM) and started again in
# a later session. Every POLL seconds, and once more at the end, the record files that are
# new or changed under the budget's record folder are committed: `git add` and `git commit`
# name those paths only, so nobody else's staged or unstaged work is touched. Extra
# arguments go to `asyncbalance study run` (e.g. --claim ID, --max-runs N, --threads 1,
# --part 1/2 beside a second `asyncbalance study run ... --part 2/2` on another core).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
STUDY=${STUDY:-studies/paper_claims.toml}
BUDGET=${BUDGET:-cpu}
RECORDS=${RECORDS:-studies/records}
POLL=${POLL:-60}
PY=${PY:-.venv/bin/python}

name=$("$PY" -c "import sys; from asyncbalance.study.spec import load_study; \
print(load_study(sys.argv[1]).name)" "$STUDY") || exit 2
folder="$RECORDS/$name/$BUDGET"

commit_records() {
    # finished records only: temporary files of a write in progress are dot-prefixed
    local paths=()
    mapfile -t paths < <(git ls-files --others --modified --exclude-standard -- "$folder" 2>/dev/null \
        | grep -E '/seed-[0-9]+\.json$')
    [ "${#paths[@]}" -eq 0 ] && return 0
    local try
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if git add -- "${paths[@]}" && git commit -q -m "Claims study records: ${#paths[@]} \
finished run(s) of the $BUDGET budget" -- "${paths[@]}"; then
            echo "committed ${#paths[@]} record(s)"
            return 0
        fi
        sleep 2   # another commit held the index lock
    done
    echo "could not commit ${#paths[@]} record(s); they stay in the working tree" >&2
    return 1
}

"$PY" -m asyncbalance.cli study run "$STUDY" --budget "$BUDGET" --records "$RECORDS" "$@" &
study_pid=$!
# TERM, not INT: a background job of a non-interactive shell starts with SIGINT ignored, and
# the CLI takes TERM as it takes Ctrl-C (the run in progress is dropped, the rest kept).
stop() { kill -TERM "$study_pid" 2>/dev/null; }
trap stop INT TERM

while kill -0 "$study_pid" 2>/dev/null; do
    sleep "$POLL" &
    wait $! 2>/dev/null
    commit_records
done
wait "$study_pid"
status=$?
commit_records
exit "$status"
