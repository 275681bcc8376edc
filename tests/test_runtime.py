"""malloc tuning: applied once, off when asked, and the user's own MALLOC_* settings win."""

import subprocess
import sys

import pytest

PROBE = "from saelab.runtime import tune_allocator as t; print(t(), t())"


def _probe(**env):
    import os
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_applies_once_and_can_be_switched_off():
    assert _probe() == ["True", "True"]
    assert _probe(SAELAB_MALLOC_TUNING="0") == ["False", "False"]
    assert _probe(MALLOC_MMAP_THRESHOLD_="65536") == ["False", "False"]
