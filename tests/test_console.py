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


def test_a_resumed_trial_shows_no_progress_its_earlier_run_wrote(tmp_path, capsys):
    """A resumed sweep starts its trials again, each with the progress file its interrupted run left: the console
    shows a trial's progress only once this run's worker writes it."""
    import json
    import time
    from types import SimpleNamespace

    from pipeline.spec.job import TrialSpecs, parse_job
    from pipeline.sweep.callbacks import ProgressCallback

    job = {"name": "resumed", "output_dir": str(tmp_path), "model": {"builtin": "digits"}, "training": {"epochs": 4}}
    spec = parse_job(job)
    callback = ProgressCallback(TrialSpecs(spec))
    callback.setup()
    trials = [SimpleNamespace(trial_id=f"r_0000{n}", config={}, status="RUNNING", last_result={}) for n in (0, 1)]
    for trial in trials:
        callback.on_trial_start(iteration=1, trials=trials, trial=trial)
    earlier, now = time.time() - 60.0, time.time() + 1.0  # the interrupted run's file; this run's worker's
    for trial, written in zip(trials, (earlier, now)):
        (tmp_path / "resumed" / f"trial-{trial.trial_id}").mkdir(parents=True)
        progress = {"step": 60, "total_steps": 80, "loss": 1.3, "tokens_per_s": 9000.0, "eta_s": 1.0, "time": written}
        (tmp_path / "resumed" / f"trial-{trial.trial_id}" / "progress.json").write_text(json.dumps(progress))
        trial.last_result = {"epoch": 4, "step": 80, "eval/accuracy": 0.3}
        callback.on_trial_complete(iteration=2, trials=trials, trial=trial)
    lines = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert lines == [["started", "r_00000"], ["started", "r_00001"], ["finished", "r_00000"],
                     ["progress", "r_00001"], ["finished", "r_00001"]]  # fmt: skip


def test_a_progress_line_says_the_trials_batch_layout_beside_its_tokens_per_second():
    stream = io.StringIO()
    console = SweepConsole("eval/accuracy", 3, stream=stream)
    console.started("a_00000", "sdlora · training.lr=0.01")
    row = {"step": 10, "total_steps": 40, "loss": 1.5, "tokens_per_s": 12345.6, "batching": "packed", "time": 3.0}
    console.refresh({"a_00000": row})
    [progress] = [line for line in stream.getvalue().splitlines() if line.startswith("progress")]
    assert " · 12,346 tokens/s packed · " in progress
