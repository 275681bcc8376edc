"""``saelab search ... | head``: a reader that leaves early ends the command quietly, as with ``cat``."""

import os
import subprocess
import sys


def test_a_closed_pipe_is_no_error(web_run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": ""}
    cmd = [sys.executable, "-m", "saelab", "search", str(web_run_dir / "features.db"), "import", "--top", "50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()                   # the reader is gone before the command prints anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == "", err                 # no "Broken pipe", no traceback
