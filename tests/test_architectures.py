"""Mamba-2 and Jamba through the whole pipeline on CPU: one sweep over the base model itself (Ray Tune, Ray Train,
DeepSpeed ZeRO-2, MLflow), each trial an SDLoRA run on a freshly built tiny model, then the export of the winner
merged and loaded back by plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.config import load_job
from pipeline.results import load_trials

MAMBA2 = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "num_heads": 8, "head_dim": 8, "n_groups": 2,
          "chunk_size": 16}  # fmt: skip
JAMBA = {"hidden_size": 32, "num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1,
         "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "mamba_d_state": 8}  # fmt: skip
JOB = {
    "name": "architectures",
    "model": {"architecture": "mamba2", "config": MAMBA2},
    "data": {"task": "digits", "max_train_samples": 64, "max_eval_samples": 16},
    # Mamba-2: 8 heads per layer, so an int count of frozen heads; half of the 32 hidden inputs per B/C row
    "method": {"name": "sdlora", "channels_frozen": 6, "states_frozen": 0.5, "inputs_frozen": 0.5, "warmup_steps": 3},
    "training": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "eval_batch_size": 16},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.75, "trial_cpus": 0.25, "max_concurrent_trials": 2},
    "search": {"space": {"model": {"grid": [
        {"architecture": "mamba2", "config": MAMBA2}, {"architecture": "jamba", "config": JAMBA},
    ]}}},  # fmt: skip
    "export": {"merge": True, "register_model": False},
}


def test_mamba2_and_jamba_sweep_and_export(tmp_path, digits_cache):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "output_dir": str(tmp_path / "runs")}))
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", str(job)], env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    sweep_dir = tmp_path / "runs" / "architectures"
    trials = load_trials(load_job(sweep_dir / "job.yaml"))
    assert sorted(t.config["model"]["architecture"] for t in trials) == ["jamba", "mamba2"]
    for trial in trials:
        assert trial.status == "TERMINATED" and trial.metrics["step"] == 64 // 8
        adapter = trial.checkpoint / "adapter"
        assert json.loads((adapter / "adapter_config.json").read_text())["model_type"] == trial.config["model"]["architecture"]
        tensors = load_file(adapter / "adapter_model.safetensors")
        assert any(k.startswith("sdt_selection.") for k in tensors) and trial.metrics["trainable_parameters"] > 0

    export = sweep_dir / "export"
    winner = json.loads((export / "trial.json").read_text())["hyperparameters"]["model"]["architecture"]
    merged = AutoModelForCausalLM.from_pretrained(export / "merged")
    assert merged.config.model_type == winner
    assert not any("parametrizations" in name for name, _ in merged.named_parameters())
