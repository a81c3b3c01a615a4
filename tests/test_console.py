"""The sweep console's lines about one trial, from Tune's events and its worker's progress file."""

from __future__ import annotations

import io

from pipeline.sweep.console import SweepConsole


def lines_of(stream: io.StringIO) -> list[str]:
    return [line.split()[0] for line in stream.getvalue().splitlines()]


def test_a_staged_trial_is_announced_when_its_worker_begins_not_when_tune_starts_it():
    """With one trial staged (its worker group waiting for a GPU) Tune starts two trials at once and cannot tell
    which will wait: each one's "started" line waits for its worker's first progress (written before its first
    step, without a step), which no progress line repeats."""
    stream = io.StringIO()
    console = SweepConsole("eval/accuracy", 3, stream=stream)
    console.started("a_00000", "sdlora · training.lr=0.01", announce=False)
    console.started("a_00001", "sdlora · training.lr=0.03", announce=False)
    assert lines_of(stream) == []
    console.refresh({"a_00000": None, "a_00001": {"total_steps": 40, "time": 1.0}})
    assert lines_of(stream) == ["started"] and "a_00001" in stream.getvalue()
    console.refresh({"a_00001": {"total_steps": 40, "time": 2.0}})
    assert lines_of(stream) == ["started"]
    row = {"step": 10, "total_steps": 40, "loss": 1.5, "tokens_per_s": 100.0, "eta_s": 3.0, "time": 3.0}
    console.refresh({"a_00001": row})
    assert lines_of(stream) == ["started", "progress"]
    console.ended("a_00000", "stopped", "early by the scheduler (ASHA) after 1 of 3 epochs")
    assert lines_of(stream) == ["started", "progress", "stopped"]


def test_a_staged_trial_that_reports_before_its_progress_is_read_is_announced_first():
    stream = io.StringIO()
    console = SweepConsole("eval/accuracy", 3, stream=stream)
    console.started("a_00000", "lora · training.lr=0.01", announce=False)
    console.reported("a_00000", {"epoch": 1, "eval/accuracy": 0.5, "train/loss": 1.0})
    console.refresh({"a_00000": {"total_steps": 40, "time": 1.0}})
    assert lines_of(stream) == ["started", "evaluated"]


def test_an_unstaged_trial_is_announced_when_tune_starts_it():
    stream = io.StringIO()
    console = SweepConsole("eval/accuracy", 3, stream=stream)
    console.started("a_00000", "lora · training.lr=0.01")
    console.refresh({"a_00000": {"total_steps": 40, "time": 1.0}})
    assert lines_of(stream) == ["started"]
