"""The examples run as a user runs them (a subprocess, tiny sizes from their flags, CPU): they train, the tuned
model beats the base on held-out sequences, and the saved adapter and merged model reload to the same logits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNS = {
    "train_plain.py": ["--warmup-steps", "5", "--steps", "40", "--batch", "8"],
    "train_hf_trainer.py": ["--warmup-steps", "5", "--examples", "160", "--epochs", "2"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_example_trains_saves_and_reloads(script, tmp_path):
    if script == "train_hf_trainer.py":
        pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'sdtune[hf]')")
    # one thread: the tiny model gains nothing from more, and a busy machine makes them spin
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(EXAMPLES / script), "--out", str(tmp_path), *RUNS[script]]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for saved in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/config.json"):
        assert (tmp_path / saved).is_file(), saved
    difference = float(re.search(r"max logit difference ([0-9.e+-]+)", result.stdout).group(1))
    assert difference <= 1e-5
    base, tuned = map(float, re.search(r"eval loss: base ([0-9.]+) -> sdlora ([0-9.]+)", result.stdout).groups())
    assert tuned < base - 0.05, result.stdout[-2000:]
