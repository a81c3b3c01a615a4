"""The state methods through the whole pipeline, as a user runs them: `sdtune validate` prints what each arm trains,
`sdtune sweep` trains one trial of each (state-offset alone, initial-state with LoRA on out_proj) on the builtin
digits base (CPU), exports the best without merging it, and `sdtune export --merge` refuses it in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from processes import failure, finished_trials, sdtune
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
ARMS = [{"name": "state-offset"}, {"name": "initial-state", "lora_targets": ["out_proj"]}]


@pytest.fixture(scope="module")
def state_sweep(tmp_path_factory, digits_cache):
    """(the sweep directory, the environment, validate's stdout, sweep's stdout)."""
    root = tmp_path_factory.mktemp("state-sweep")
    quickstart = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    job = {
        **quickstart,
        "name": "states",
        "output_dir": str(root / "runs"),
        "data": {"task": "digits", "max_train_samples": 64, "max_eval_samples": 16},
        "method": ARMS[0],
        "training": {**quickstart["training"], "epochs": 1, "max_steps": 3, "eval_batch_size": 16},
        "search": {"metric": "eval/accuracy", "mode": "max", "space": {"method": {"grid": ARMS}}},
        "export": {"merge": False},  # registration stays on: the export must skip it for a state method
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    validated = sdtune("validate", str(path), env=env)
    assert validated.returncode == 0, failure(validated)
    result = sdtune("sweep", str(path), env=env)
    assert result.returncode == 0, failure(result)
    return root / "runs" / "states", env, validated.stdout, result.stdout


def test_validate_prints_the_state_each_arm_trains(state_sweep):
    _, _, validated, _ = state_sweep
    # the digits base: 2 mixers of 128 channels and 8 states; LoRA r8 on its out_proj (64 × 128): 1,536 parameters
    assert "state-offset: 2 × MambaMixer: state offset 128 × 8: 1,024 trainable parameters each" in validated
    assert "LoRA r8 on out_proj; state initial 128 × 8: 2,560 trainable parameters each" in validated, validated


def test_both_trials_finish_and_the_best_is_exported_unmerged_and_unregistered(state_sweep):
    sweep_dir, _, _, stdout = state_sweep
    assert "trials: 2 (0 failed)" in stdout
    assert finished_trials(sweep_dir / "tune") == 2
    export = sweep_dir / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    kind = {"state-offset": "offset", "initial-state": "initial"}[config["sdt"]["method"]]
    with safe_open(str(export / "adapter_model.safetensors"), framework="pt") as f:
        states = [key for key in f.keys() if key.endswith(f".sdt_state.{kind}")]
    assert len(states) == 2  # one per mixer of the digits base
    assert not (export / "merged").exists()
    assert json.loads((export / "trial.json").read_text())["mlflow"]["registered_model"] is None


def test_export_with_merge_is_refused_in_one_line_and_writes_nothing(state_sweep):
    sweep_dir, env, _, _ = state_sweep
    before = {p.name: p.stat().st_mtime_ns for p in (sweep_dir / "export").iterdir()}
    refused = sdtune("export", str(sweep_dir), "--merge", env=env)
    assert refused.returncode == 2, failure(refused)
    assert refused.stderr.strip().count("\n") == 0 and "cannot be merged into weights" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (sweep_dir / "export").iterdir()} == before
