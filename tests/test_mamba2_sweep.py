"""jobs/mamba2-tiny.yaml end to end, as a user runs it: ``sdtune sweep`` on a real local Ray cluster, SDLoRA with
the default counts against LoRA on out_proj on a tiny Mamba-2; both trials train, the best is exported and merged,
and the merged model, loaded by plain transformers, computes what base + adapter computes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from processes import failure, sdtune
from transformers import AutoModelForCausalLM, Mamba2ForCausalLM

import sdt
from pipeline.results.outcomes import load_trials
from pipeline.spec.job import load_job
from pipeline.storage.layout import ADAPTER_DIR
from pipeline.trial.models import load_base_model

JOB = Path(__file__).resolve().parent.parent / "jobs" / "mamba2-tiny.yaml"
STEPS = 96 // 8  # max_train_samples / batch_size, one epoch


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_cache):
    root = tmp_path_factory.mktemp("mamba2-sweep")
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    result = sdtune("sweep", str(JOB), "--set", f"output_dir={root}", env=env)
    assert result.returncode == 0, failure(result)
    return root / load_job(JOB).name


def test_sdlora_with_the_default_counts_and_lora_both_train(sweep):
    """Each arm ran every step; SDLoRA's selection is the default rule's (1 of 8 heads, 2 of 8 states, 1 of 32
    inputs, in the one group that holds the head) and its count is what `sdtune validate` prints."""
    trials = {t.spec.method.name: t for t in load_trials(load_job(sweep / "job.yaml"))}
    assert set(trials) == {"sdlora", "lora"}
    for trial in trials.values():
        assert trial.status == "TERMINATED" and trial.metrics["step"] == STEPS
    assert trials["sdlora"].metrics["trainable_parameters"] == 2 * 773  # docs: 773 per layer, 2 layers
    assert trials["lora"].metrics["trainable_parameters"] == 2 * 768
    adapter = json.loads((trials["sdlora"].checkpoint / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["model_type"] == "mamba2" and adapter["sdt"]["channels_frozen"] is None
    assert {tuple(shapes["inputs"]) for shapes in adapter["selected"].values()} == {(1, 2, 1)}
    assert {tuple(shapes["channels"]) for shapes in adapter["selected"].values()} == {(1,)}


def test_the_export_merges_into_a_plain_mamba2_that_computes_base_plus_adapter(sweep):
    export = sweep / "export"
    winner = json.loads((export / "trial.json").read_text())
    [trial] = [t for t in load_trials(load_job(sweep / "job.yaml")) if t.trial_id == winner["trial_id"]]
    merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
    assert type(merged) is Mamba2ForCausalLM
    assert not any("parametrizations" in name for name, _ in merged.named_parameters())
    base, _ = load_base_model(trial.spec.model.model_copy(update={"dtype": "float32"}), "cpu", log=lambda _: None)
    adapted = sdt.load(base, export).model.eval()
    tokens = torch.randint(0, 17, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The merged weights are the effective weights the adapters form, stored once; the same fp32 forward
        # follows. Only a different summation order inside a kernel could part them, far below 1e-5.
        torch.testing.assert_close(merged(input_ids=tokens).logits, adapted(input_ids=tokens).logits, atol=1e-5, rtol=0)
