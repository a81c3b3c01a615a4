"""Nothing lost, nothing lied about: one small CPU sweep taken through what users do to sweeps, on the two other
architectures.

Four trials on the built-in digits task, one at a time: SDLoRA with the DoRA variant on a freshly built tiny Mamba-2
and Jamba, each at a learning rate of 2e-2 and of 1e30 (the SDT warmup's loss turns NaN at once there, as a user's
bad grid would). While it runs, a second ``sdtune sweep`` of the same job is refused; then Ctrl+C (SIGINT to the
command's process group, as a terminal sends it) stops it: exit 130, the MLflow parent and the running trial KILLED,
nothing exported. ``sdtune resume`` finishes it without training a finished trial again: the diverged trials FAILED
with their reason (in MLflow and the report), the others exported, merged, as plain transformers loads them. A sweep
of another spec under the same name is refused and leaves every file of the finished one as it was; its export still
works. Real Ray, DeepSpeed and MLflow throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient
from processes import finished_trials, wait_for
from safetensors.torch import load_file
from typer.testing import CliRunner

import sdt
from pipeline.cli.commands import app
from pipeline.results.export import export_trials
from pipeline.results.outcomes import load_trials
from pipeline.results.tracking import ERROR_TAG, SweepTracker, tracking_uri
from pipeline.spec.job import load_job
from pipeline.storage.layout import ADAPTER_DIR
from pipeline.storage.paths import LOCK_FILE
from pipeline.trial.models import load_base_model

MAMBA2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "state_size": 8,
    "num_heads": 8,
    "head_dim": 8,
    "n_groups": 2,
    "chunk_size": 16,
}
JAMBA = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "num_experts": 2,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "mamba_d_state": 8,
}
ARCHITECTURES = [{"architecture": "mamba2", "config": MAMBA2}, {"architecture": "jamba", "config": JAMBA}]
SANE, DIVERGING = 2e-2, 1e30
JOB = {
    "name": "reliability",
    "model": ARCHITECTURES[0],
    "data": {"task": "digits", "max_train_samples": 96, "max_eval_samples": 24},
    # Mamba-2: 8 heads per layer, so an int count of frozen heads; half of the 32 hidden inputs per B/C row
    "method": {
        "name": "sdlora",
        "lora_variant": "dora",
        "channels_frozen": 6,
        "states_frozen": 0.5,
        "inputs_frozen": 0.5,
        "warmup_steps": 3,
    },
    "training": {"epochs": 2, "batch_size": 8, "lr": SANE, "eval_batch_size": 24},
    "resources": {"num_workers": 1, "cpus_per_worker": 1, "trial_cpus": 0.25, "max_concurrent_trials": 1},
    "search": {"space": {"model": {"grid": ARCHITECTURES}, "training.lr": {"grid": [SANE, DIVERGING]}}},
    "export": {"merge": True, "register_model": False},
}
STEPS = 2 * 96 // 8


def arm(trial) -> str:
    return f"{trial.spec.model.architecture}@{trial.spec.training.lr:g}"


def sdtune(*args: str, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli.commands", *args], env=env, text=True, **popen)


def checkpoints(sweep_dir: Path, trial_id: str) -> list[str]:
    return sorted(p.name for p in (sweep_dir / f"trial-{trial_id}").glob("checkpoint_*"))


def files_digest(directory: Path) -> dict[str, str]:
    """A hash per file of the sweep's own records (not Ray's or MLflow's live state)."""
    names = [p for p in directory.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


@pytest.fixture(scope="module")
def env(digits_cache):
    return {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("reliability")
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "output_dir": str(root / "runs")}))
    sweep_dir = root / "runs" / "reliability"
    log = root / "first.log"
    with log.open("w") as out:
        first = sdtune("sweep", str(job), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(
            lambda: (sweep_dir / LOCK_FILE).is_file() and (sweep_dir / LOCK_FILE).read_text().strip(),
            300,
            "the sweep to claim its directory",
        )
        # in this process: refused before anything starts (a subprocess would spend ~10 s importing the stack)
        second = CliRunner().invoke(app, ["sweep", str(job)])
        refused = (second.exit_code, second.output, ray.is_initialized())
        wait_for(lambda: finished_trials(sweep_dir / "tune") >= 1, 900, "a finished trial")
        os.killpg(first.pid, signal.SIGINT)  # Ctrl+C in a terminal: the whole foreground process group
        interrupted = first.wait(timeout=600)
    interrupted_trials = load_trials(load_job(sweep_dir / "job.yaml"))
    finished = [t.trial_id for t in interrupted_trials if t.status == "TERMINATED"]
    finished_before = {trial_id: checkpoints(sweep_dir, trial_id) for trial_id in finished}
    exported_after_interrupt = (sweep_dir / "export").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.commands", "resume", str(sweep_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return {
        "root": root,
        "job": job,
        "sweep_dir": sweep_dir,
        "refused": refused,
        "interrupted": interrupted,
        "first_output": log.read_text(),
        "interrupted_trials": interrupted_trials,
        "finished_before": finished_before,
        "exported_after_interrupt": exported_after_interrupt,
        "resumed": resumed,
    }


def test_a_second_sweep_of_the_same_directory_is_refused_at_once(sweep):
    code, output, started_ray = sweep["refused"]
    assert code == 2 and not started_ray, output
    assert "another sdtune command (pid" in output and "is working on it" in output


def test_ctrl_c_stops_the_sweep_as_killed_with_nothing_exported(sweep):
    assert sweep["interrupted"] == 130, sweep["first_output"][-3000:]
    assert not sweep["exported_after_interrupt"]
    statuses = [t.status for t in sweep["interrupted_trials"]]
    ended = statuses.count("TERMINATED") + statuses.count("ERROR")
    assert statuses.count("TERMINATED") >= 1 and ended < 4
    # the trial cut short is not counted as ended (Ray Tune marks it TERMINATED), and the sweep has four to run
    last = sweep["first_output"].strip().splitlines()[-1]
    assert last.startswith(f"interrupted: {ended} of 4 trials ended; nothing exported;")
    assert f"sdtune resume {sweep['sweep_dir']}" in last


def test_resume_finishes_it_and_the_mlflow_runs_tell_what_happened(sweep):
    resumed = sweep["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    spec = load_job(sweep["sweep_dir"] / "job.yaml")
    trials = {arm(t): t for t in load_trials(spec)}
    diverged, sane = [trials["mamba2@1e+30"], trials["jamba@1e+30"]], [trials["mamba2@0.02"], trials["jamba@0.02"]]
    assert all(t.status == "ERROR" and "diverged: the SDT warmup's loss" in t.error for t in diverged)
    assert all(t.status == "TERMINATED" for t in sane)
    assert sweep["finished_before"]
    for trial_id, before in sweep["finished_before"].items():  # not trained again
        assert checkpoints(sweep["sweep_dir"], trial_id) == before
    # the cost records of the trials the resumed driver ran (its callback restored from the interrupted run's) add up
    resumed_sane = [t for t in sane if t.trial_id not in sweep["finished_before"]]
    assert resumed_sane
    for trial in resumed_sane:
        assert trial.cost and abs(trial.cost["other"]) <= 0.05 * trial.cost["wall"], (trial.trial_id, trial.cost)
    client = MlflowClient(tracking_uri(spec))
    tracker = SweepTracker(spec)
    for trial in diverged:
        run = client.get_run(tracker.find_trial_run(trial.trial_id))
        assert run.info.status == "FAILED" and "diverged" in run.data.tags[ERROR_TAG]
    assert all(client.get_run(tracker.find_trial_run(t.trial_id)).info.status == "FINISHED" for t in sane)
    parent = client.get_run(tracker.find_sweep())
    assert parent.info.status == "FINISHED"
    summary = (sweep["sweep_dir"] / "report" / "summary.md").read_text()
    for trial in diverged:
        [line] = [line for line in summary.splitlines() if line.startswith(f"- `{trial.trial_id}` (sdlora): ")]
        assert "diverged: the SDT warmup's loss" in line
    # the console said so as it happened, in one line naming the trial's values (the model last) and the reason
    consoles = (sweep["first_output"] + resumed.stdout).splitlines()
    [failed] = [line for line in consoles if line.startswith("failed") and f" {diverged[0].trial_id} " in line]
    assert "sdlora · training.lr=1e+30, model=architecture=mamba2 " in failed and "diverged" in failed
    assert len(failed) <= 300


def test_both_architectures_train_through_the_sweep_and_export_merged(sweep, tmp_path):
    """Each sane trial trained every step with its SDT selection and DoRA adapter, and merged into its base (as the
    sweep's export of the winner is) it computes what the adapted model does."""
    from transformers import AutoModelForCausalLM

    spec = load_job(sweep["sweep_dir"] / "job.yaml")
    sane = [t for t in load_trials(spec) if t.status == "TERMINATED"]
    assert sorted(t.spec.model.architecture for t in sane) == ["jamba", "mamba2"]
    tokens = torch.randint(0, 17, (2, 40), generator=torch.Generator().manual_seed(0))
    for trial in sane:
        assert trial.metrics["step"] == STEPS and trial.metrics["eval/accuracy"] > 0
        adapter = trial.checkpoint / ADAPTER_DIR
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["model_type"] == trial.spec.model.architecture and config["sdt"]["lora_variant"] == "dora"
        assert any(k.startswith("sdt_selection.") for k in load_file(adapter / "adapter_model.safetensors"))
        out = export_trials(
            spec, [trial], SweepTracker(spec), out=tmp_path / trial.trial_id, merge=True, log=lambda _: None
        )
        base, _ = load_base_model(trial.spec.model.model_copy(update={"dtype": "float32"}), "cpu")
        adapted = sdt.load(base, adapter).model.eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        assert not any("parametrizations" in name for name, _ in merged.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(
                merged(input_ids=tokens).logits, adapted(input_ids=tokens).logits, atol=1e-4, rtol=1e-4
            )
    export = sweep["sweep_dir"] / "export"
    winner = json.loads((export / "trial.json").read_text())["hyperparameters"]["model"]["architecture"]
    assert AutoModelForCausalLM.from_pretrained(export / "merged").config.model_type == winner


def test_another_spec_under_the_same_name_is_refused_and_changes_nothing(sweep):
    sweep_dir = sweep["sweep_dir"]
    before = files_digest(sweep_dir / "export") | {"job.yaml": files_digest(sweep_dir)["job.yaml"]}
    # in this process: refused before anything starts (a subprocess would spend ~10 s importing the stack)
    other = CliRunner().invoke(app, ["sweep", str(sweep["job"]), "--set", "training.lr=0.5"])
    assert other.exit_code == 2, other.output
    assert "holds another sweep" in other.output and "training.lr" in other.output and "sdtune resume" in other.output
    assert not ray.is_initialized()
    after = files_digest(sweep_dir / "export") | {"job.yaml": files_digest(sweep_dir)["job.yaml"]}
    assert after == before
    again = CliRunner().invoke(app, ["export", str(sweep_dir)])
    assert again.exit_code == 0 and "up to date" in again.output, again.output


def test_a_sweep_that_fails_after_validation_says_so_in_one_line(tmp_path, env):
    """Every trial diverges, so nothing can be exported: exit 1, one line (the traceback goes to the sweep
    directory), and the MLflow parent run ends FAILED."""
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                **JOB,
                "name": "all-diverge",
                "output_dir": str(tmp_path / "runs"),
                "method": {"name": "full"},
                "training": {**JOB["training"], "epochs": 1, "lr": DIVERGING},
                "search": {"space": {}},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.commands", "sweep", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sweep failed: NoUsableTrialError: ") and "driver-error.log" in last
    sweep_dir = tmp_path / "runs" / "all-diverge"
    assert "NoUsableTrialError" in (sweep_dir / "driver-error.log").read_text()
    spec = load_job(sweep_dir / "job.yaml")
    assert MlflowClient(tracking_uri(spec)).get_run(SweepTracker(spec).find_sweep()).info.status == "FAILED"
    assert not (sweep_dir / "export").exists()
