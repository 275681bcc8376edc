"""saelab.progress: a log gets lines, never redraws; a terminal gets a tqdm bar; stages say their duration."""

import io

import pytest
from tqdm import tqdm

from saelab import progress
from saelab.progress import LineProgress, bar, format_count, format_duration, stage


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A hand-turned time.monotonic for the module under test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def test_format_duration_and_count():
    assert format_duration(0.4) == "0 s"
    assert format_duration(42) == "42 s"
    assert format_duration(205) == "3 min 25 s"
    assert format_duration(3720) == "1 h 02 min"
    assert format_count(1234, scale=False) == "1,234"
    assert format_count(1_234_000, scale=True) == "1.23M"
    assert format_count(999, scale=True) == "999"


def test_a_log_gets_whole_lines_on_the_interval_with_an_eta(clock):
    log = io.StringIO()
    p = LineProgress(total=1000, desc="harvest", unit="tok", stream=log, interval=20)
    clock.t += 1
    p.update(10)                          # within the first 2 s: nothing yet
    clock.t += 9
    p.update(90)                          # 10 s, 100 of 1000 at 10 tok/s: 90 s to go
    clock.t += 10
    p.update(100)                         # 10 s after the last line: within the interval
    clock.t += 8
    p.update(800)
    p.close()
    p.close()                             # closing twice writes once
    text = log.getvalue()
    assert "\r" not in text
    assert text.splitlines() == ["saelab: harvest: 100/1,000 tok (10%) · 10 s · 10 tok/s · ETA 1 min 30 s",
                                 "saelab: harvest: 1,000/1,000 tok (100%) · done in 28 s · 35 tok/s"]


def test_a_step_done_within_two_seconds_leaves_no_lines(clock):
    log = io.StringIO()
    with LineProgress(total=3, desc="tokenising", stream=log) as p:
        clock.t += 1.5
        p.update(3)
    assert log.getvalue() == ""


def test_bar_off_a_terminal_is_lines_and_on_a_terminal_is_tqdm(clock):
    log = io.StringIO()
    with bar(total=3, desc="x", stream=log) as b:
        assert isinstance(b, LineProgress)
        b.set_postfix(loss="0.5")
        clock.t += 2
        b.update(3)
    assert log.getvalue().splitlines()[-1] == "saelab: x: 3/3 it (100%) · done in 2 s · 1.5 it/s · loss=0.5"
    term = Terminal()
    b = bar(total=3, desc="x", stream=term)
    assert isinstance(b, tqdm)
    b.close()


def test_bar_iterates_and_counts_a_resumed_run_from_initial(clock):
    log = io.StringIO()
    for _ in bar([1, 2, 3], desc="it", stream=log):
        clock.t += 1
    assert log.getvalue().splitlines()[-1] == "saelab: it: 3/3 it (100%) · done in 3 s · 1 it/s"
    log = io.StringIO()
    p = bar(total=100, initial=40, unit="step", stream=log)
    clock.t += 30
    p.update(30)                          # 30 steps in 30 s, 30 to go: the rate ignores the 40 already done
    assert p.line().endswith("1 step/s · ETA 30 s")


def test_disabled_and_env_silence(monkeypatch, clock):
    log = io.StringIO()
    with bar(total=5, stream=log, disable=True) as b:
        b.update(5)
    monkeypatch.setenv("SAELAB_PROGRESS", "0")
    with bar(total=5, stream=log) as b, stage("train", stream=log):
        b.update(5)
    assert log.getvalue() == ""


def test_stage_names_its_step_and_duration_and_failure(clock):
    log = io.StringIO()
    with stage("train", 2, 5, stream=log):
        clock.t += 190
    with pytest.raises(RuntimeError):
        with stage("eval", stream=log):
            clock.t += 12
            raise RuntimeError("boom")
    assert log.getvalue().splitlines() == ["saelab: [2/5] train ...", "saelab: [2/5] train done in 3 min 10 s",
                                           "saelab: eval ...", "saelab: eval failed after 12 s"]
