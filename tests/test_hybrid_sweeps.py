"""Tiny hybrid jobs (jobs/*-tiny.yaml of three of the five hybrid families) end to end, as a user runs them: ``sdtune
sweep`` on a real local Ray cluster, the hybrid preset against LoRA on attention and MLP only; before any trial the
console and the sweep's MLflow run say what each arm touches per layer type; both trials train as many parameters as
``sdt.plan`` says, the best is exported and merged, and the merged model, loaded by plain
transformers, computes what base + adapter computes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from processes import failure, sdtune
from transformers import AutoModelForCausalLM

import sdt
from pipeline.results.outcomes import load_trials
from pipeline.spec.job import load_job
from pipeline.storage.layout import ADAPTER_DIR
from pipeline.trial.models import load_base_model

JOBS = Path(__file__).resolve().parent.parent / "jobs"
# Three of the five families end to end (a sweep is ~100 s of the suite, mostly Ray and process start-up): Bamba
# (attention + gated MLP), Granite-4.0-H (MoE beside a shared MLP) and Zamba2 (one shared block at several depths).
# Nemotron-H's and Falcon-H1's adapters, saving, merging and reloading are tests/test_hybrids.py's, and their jobs
# are validated with every shipped job (tests/test_jobs.py).
HYBRID_JOBS = ["bamba-tiny", "granite-4.0-h-tiny", "zamba2-tiny"]
STEPS = 96 // 8  # max_train_samples / batch_size, one epoch


@pytest.fixture(scope="module", params=HYBRID_JOBS)
def sweep(request, tmp_path_factory, digits_cache):
    job = JOBS / f"{request.param}.yaml"
    root = tmp_path_factory.mktemp(request.param)
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    result = sdtune("sweep", str(job), "--set", f"output_dir={root}", env=env)
    assert result.returncode == 0, failure(result)
    return root / load_job(job).name, result.stdout


def base_of(trial) -> torch.nn.Module:
    base, _ = load_base_model(trial.spec.model.model_copy(update={"dtype": "float32"}), "cpu", log=lambda _: None)
    return base


def test_the_console_and_mlflow_show_what_each_arm_touches_before_training(sweep):
    sweep, console = sweep
    [preset, baseline] = [line for line in console.splitlines() if ": layers: mamba " in line]
    assert preset.startswith("sdlora warmup_steps=3: layers: mamba ") and "(SDT+LoRA)" in preset
    assert baseline.startswith("lora [] attn:q+k+v+o mlp:gate+up+down: layers: mamba 0/")
    assert all(line.split("; ")[-1].startswith("trainable: ") for line in (preset, baseline))
    [plan] = sweep.rglob("plan.txt")  # the parent run's artifact, in the sweep's own MLflow store
    assert preset.split(": layers: ")[1].split(";")[0] in plan.read_text()


def test_both_arms_train_what_the_plan_says(sweep):
    sweep, _ = sweep
    trials = {t.spec.method.name: t for t in load_trials(load_job(sweep / "job.yaml"))}
    assert set(trials) == {"sdlora", "lora"}
    for trial in trials.values():
        assert trial.status == "TERMINATED" and trial.metrics["step"] == STEPS
        low, high = sdt.plan(base_of(trial), trial.spec.method.to_sdt_config(seed=0)).trainable
        assert low <= trial.metrics["trainable_parameters"] <= high
    adapter = json.loads((trials["sdlora"].checkpoint / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["sdt"]["attention_lora_targets"] is None  # the preset's default: q, k, v, o


def test_the_export_merges_into_a_plain_model_that_computes_base_plus_adapter(sweep):
    sweep, _ = sweep
    export = sweep / "export"
    winner = json.loads((export / "trial.json").read_text())
    [trial] = [t for t in load_trials(load_job(sweep / "job.yaml")) if t.trial_id == winner["trial_id"]]
    merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
    base = base_of(trial)
    assert type(merged) is type(base)
    assert not any("parametrizations" in name for name, _ in merged.named_parameters())
    adapted = sdt.load(base, export).model.eval()
    tokens = torch.randint(0, 17, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The merged weights are the effective weights the adapters form, stored once; the same fp32 forward
        # follows. Only a different summation order inside a kernel could part them, far below 1e-5.
        torch.testing.assert_close(merged(input_ids=tokens).logits, adapted(input_ids=tokens).logits, atol=1e-5, rtol=0)
