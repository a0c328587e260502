"""``scripts/study_background.sh``: a TERM to the script stops the study it started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_background.sh"

# Stands in for the interpreter: names the study, then "runs" it until a signal arrives and
# writes down which one (SIGINT left at its disposition, as Python's CLI would inherit it).
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then echo no_such_study_for_this_test; exit 0; fi
trap 'echo TERM > "$MARKS/signal"; exit 130' TERM
trap 'echo INT > "$MARKS/signal"; exit 130' INT
echo started > "$MARKS/started"
for _ in $(seq 600); do sleep 0.1; done
echo none > "$MARKS/signal"
"""


def test_a_term_to_the_script_stops_its_study(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "MARKS": str(tmp_path), "POLL": "1"}
    # As the README starts it: in the background of a non-interactive shell, where the
    # study process starts with SIGINT ignored.
    script = subprocess.Popen(["bash", "-c", f"bash {SCRIPT} & echo $! > {tmp_path}/pid; "
                               "wait $!"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists()
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
        script.wait(timeout=20)
        assert (tmp_path / "signal").read_text().strip() == "TERM"
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
