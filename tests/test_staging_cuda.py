"""A sequential sweep on one GPU stages its next trial: Tune starts it while the other trains, its worker group
waits for the GPU in Ray's placement-group queue, and the two never train at once.

Run on a CUDA machine with one GPU: ``python -m pytest -m cuda tests/test_staging_cuda.py``. Skipped elsewhere.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.results.outcomes import load_trials
from pipeline.spec.job import load_job

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
TRIALS = 3


def test_a_sequential_sweep_stages_the_next_trial_and_trains_one_at_a_time(tmp_path, digits_cache):
    import torch

    if torch.cuda.device_count() != 1:
        pytest.skip("staging is decided by the GPUs the cluster has: this test wants exactly one")
    overrides = ["name=staged", f"output_dir={tmp_path}", "resources.use_gpu=true", "resources.max_concurrent_trials=1",
                 "search.scheduler=fifo", "training.epochs=1", "export.register_model=false",
                 "search.space={training.lr: {grid: [1.0e-2, 2.0e-2, 3.0e-2]}}"]  # fmt: skip
    # Real trials outlast Ray Train's worker-group start timeout (300 s as sdtune sets it): a staged trial waits
    # longer without asking again (it would lose its place in Ray's queue and its wait would be misread). 5 s here,
    # shorter than these trials, shows that it does.
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.commands", "sweep", str(ROOT / "jobs" / "quickstart.yaml"),
         *(arg for item in overrides for arg in ("--set", item))],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"trials: {TRIALS} (0 failed)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert "WorkerGroupStartupTimeoutError" not in (tmp_path / "staged" / "logs" / "workers.log").read_text()

    trials = sorted(load_trials(load_job(tmp_path / "staged" / "job.yaml")), key=lambda trial: trial.cost["began_at"])
    assert len(trials) == TRIALS and all(t.status == "TERMINATED" and t.cost["gpus"] == 1 for t in trials)
    for before, after in itertools.pairwise(trials):  # one GPU: placed only once the trial before had reported its last
        assert after.cost["began_at"] > before.cost["last_report_at"], (before.cost, after.cost)
    # Tune started the next trial while the one before trained: it waited for the GPU, its Ray processes already up
    assert any(after.cost["started_at"] < before.cost["last_report_at"] for before, after in itertools.pairwise(trials))
    for trial in trials:  # announced once, when its worker began, whether it waited or not
        assert sum(line.split()[:2] == ["started", trial.trial_id] for line in result.stdout.splitlines()) == 1
