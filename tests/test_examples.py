"""The examples run as a user runs them (as ``__main__``, with a command line: tiny sizes from their flags, CPU),
in this process (a subprocess would spend ~8 s importing the stack again): they train, the tuned model beats the
base on held-out sequences, and the saved adapter and merged model reload to the same logits."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNS = {
    "train_plain.py": ["--warmup-steps", "5", "--steps", "40", "--batch", "8"],
    "train_hf_trainer.py": ["--warmup-steps", "5", "--examples", "160", "--epochs", "2"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_example_trains_saves_and_reloads(script, tmp_path, monkeypatch, capsys):
    if script == "train_hf_trainer.py":
        pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'sdtune[hf]')")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), "--out", str(tmp_path), *RUNS[script]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more, and a busy machine makes them spin
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    for saved in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/config.json"):
        assert (tmp_path / saved).is_file(), saved
    difference = float(re.search(r"max logit difference ([0-9.e+-]+)", stdout).group(1))
    assert difference <= 1e-5
    base, tuned = map(float, re.search(r"eval loss: base ([0-9.]+) -> sdlora ([0-9.]+)", stdout).groups())
    assert tuned < base - 0.05, stdout[-2000:]
