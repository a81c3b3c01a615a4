"""A method of a user's own, registered in a module of theirs, goes through the whole pipeline: `sdtune validate`,
then `sdtune sweep` (one trial on the builtin digits base, CPU; export and report), no file of pipeline/ knowing
its name. The job spec's ``imports`` brings it into the command and every Ray process; the module lives outside the
repository, found through PYTHONPATH as a user's own package would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from processes import failure, finished_trials, plugin_env, sdtune

ROOT = Path(__file__).resolve().parents[1]
TOY_METHOD = """
import sdt

sdt.register_method(
    sdt.Method(
        name="toy",
        title="Toy",
        summary="LoRA rank 2 on out_proj only",
        lora="required",
        sdt="none",
        defaults={"lora_rank": 2, "lora_targets": ("out_proj",), "sdt_targets": ()},
        baseline="lora",
    )
)
"""


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory, digits_cache):
    """The toy method's one-trial sweep, after `sdtune validate` passed: (the sweep directory, sweep's stdout)."""
    root = tmp_path_factory.mktemp("toy")
    (root / "toy_method.py").write_text(TOY_METHOD)
    quickstart = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    job = {
        **quickstart,
        "name": "toy",
        "output_dir": str(root / "runs"),
        "imports": ["toy_method"],
        "data": {"task": "digits", "max_train_samples": 64, "max_eval_samples": 16},
        "method": {"name": "toy"},
        "training": {**quickstart["training"], "epochs": 1, "max_steps": 3, "eval_batch_size": 16},
        "search": {"metric": "eval/accuracy", "mode": "max", "space": {}},
        # registering would merge the adapter and log an MLflow model of it: the same for every method
        "export": {"register_model": False},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = plugin_env(digits_cache, root)
    validated = sdtune("validate", str(path), env=env)
    assert validated.returncode == 0 and "valid (toy on digits" in validated.stdout, failure(validated)
    result = sdtune("sweep", str(path), env=env)
    assert result.returncode == 0, failure(result)
    return root / "runs" / "toy", result.stdout


def test_the_toy_trial_finished(toy_sweep):
    sweep_dir, stdout = toy_sweep
    assert "trials: 1 (0 failed)" in stdout
    assert finished_trials(sweep_dir / "tune") == 1


def test_the_export_is_the_toy_methods_adapter(toy_sweep):
    sweep_dir, _ = toy_sweep
    config = json.loads((sweep_dir / "export" / "adapter_config.json").read_text())
    assert config["method"] == "toy" and config["sdt"]["method"] == "toy"
    assert config["description"] == "toy (LoRA rank 2 on out_proj only); LoRA rank 2, alpha 8 on out_proj"
    assert config["targets"] == {"lora": ["out_proj"], "sdt": []} and config["selected"] == {}
    assert json.loads((sweep_dir / "export" / "trial.json").read_text())["status"] == "TERMINATED"
    assert "A `toy` adapter" in (sweep_dir / "export" / "README.md").read_text()


def test_the_report_lists_the_toy_arm_and_compares_it_with_its_baseline(toy_sweep):
    sweep_dir, _ = toy_sweep
    summary = (sweep_dir / "report" / "summary.md").read_text()
    assert "| **toy** (best) |" in summary
    assert "No Toy vs LoRA comparison: no lora trial finished with a finite eval/accuracy." in summary
