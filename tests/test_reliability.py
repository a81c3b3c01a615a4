"""Nothing lost, nothing lied about: one small CPU sweep taken through what users do to sweeps.

Four trials on the built-in digits task, one at a time: LoRA with the DoRA variant and full fine-tuning, each at a
learning rate of 2e-2 and of 1e30 (full fine-tuning's loss turns NaN at once there, as a user's bad grid would).
While it runs, a second ``sdtune sweep`` of the same job is refused; then Ctrl+C (SIGINT to the command's process
group, as a terminal sends it) stops it: exit 130, the MLflow parent and the running trial KILLED, nothing exported.
``sdtune resume`` finishes it without training a finished trial again: the diverged trial FAILED with its reason (in
MLflow and the report), the others exported. A sweep of another spec under the same name is refused and leaves
every file of the finished one as it was; its export still works. Real Ray, DeepSpeed and MLflow throughout.
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
from typer.testing import CliRunner

import sdt
from pipeline.cli import app
from pipeline.config import load_job
from pipeline.export import export_trials
from pipeline.models import load_base_model
from pipeline.results import ADAPTER_DIR, load_trials
from pipeline.storage import LOCK_FILE
from pipeline.tracking import ERROR_TAG, SweepTracker, tracking_uri
from processes import finished_trials, wait_for

DORA = {"name": "lora", "lora_variant": "dora", "lora_rank": 4, "lora_targets": ["x_proj", "dt_proj", "out_proj"]}
SANE, DIVERGING = 2e-2, 1e30
JOB = {
    "name": "reliability",
    "model": {"builtin": "digits"},
    "data": {"task": "digits", "max_train_samples": 96, "max_eval_samples": 24},
    "method": {"name": "sdlora", "channels_frozen": 0.9, "warmup_steps": 3},
    "training": {"epochs": 2, "batch_size": 8, "lr": 2e-2, "eval_batch_size": 24},
    "resources": {"num_workers": 1, "cpus_per_worker": 1, "trial_cpus": 0.25, "max_concurrent_trials": 1},
    "search": {"space": {"method": {"grid": [DORA, {"name": "full"}]}, "training.lr": {"grid": [SANE, DIVERGING]}}},
    "export": {"register_model": False},
}


def arm(trial) -> str:
    method = "dora" if trial.spec.method.lora_variant == "dora" else trial.spec.method.name
    return f"{method}@{trial.spec.training.lr:g}"


def sdtune(*args: str, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, text=True, **popen)


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
        wait_for(lambda: (sweep_dir / LOCK_FILE).is_file() and (sweep_dir / LOCK_FILE).read_text().strip(), 300,
                 "the sweep to claim its directory")  # fmt: skip
        second = sdtune("sweep", str(job), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        refused = (second.wait(timeout=300), second.stdout.read())
        wait_for(lambda: finished_trials(sweep_dir / "tune") >= 1, 900, "a finished trial")
        os.killpg(first.pid, signal.SIGINT)  # Ctrl+C in a terminal: the whole foreground process group
        interrupted = first.wait(timeout=600)
    interrupted_trials = load_trials(load_job(sweep_dir / "job.yaml"))
    finished = [t.trial_id for t in interrupted_trials if t.status == "TERMINATED"]
    finished_before = {trial_id: checkpoints(sweep_dir, trial_id) for trial_id in finished}
    exported_after_interrupt = (sweep_dir / "export").exists()
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "resume", str(sweep_dir)], env=env,
                             capture_output=True, text=True, timeout=1200)  # fmt: skip
    return {
        "root": root, "job": job, "sweep_dir": sweep_dir, "refused": refused, "interrupted": interrupted,
        "first_output": log.read_text(), "interrupted_trials": interrupted_trials, "finished_before": finished_before,
        "exported_after_interrupt": exported_after_interrupt, "resumed": resumed,
    }  # fmt: skip


def test_a_second_sweep_of_the_same_directory_is_refused_at_once(sweep):
    code, output = sweep["refused"]
    assert code == 2, output
    assert "another sdtune command (pid" in output and "is working on it" in output


def test_ctrl_c_stops_the_sweep_as_killed_with_nothing_exported(sweep):
    assert sweep["interrupted"] == 130, sweep["first_output"][-3000:]
    last = sweep["first_output"].strip().splitlines()[-1]
    assert last.startswith("interrupted:") and f"sdtune resume {sweep['sweep_dir']}" in last
    assert not sweep["exported_after_interrupt"]
    statuses = [t.status for t in sweep["interrupted_trials"]]
    assert statuses.count("TERMINATED") >= 1 and statuses.count("TERMINATED") + statuses.count("ERROR") < 4


def test_resume_finishes_it_and_the_mlflow_runs_tell_what_happened(sweep):
    resumed = sweep["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    spec = load_job(sweep["sweep_dir"] / "job.yaml")
    trials = {arm(t): t for t in load_trials(spec)}
    diverged, sane = trials["full@1e+30"], [trials["dora@0.02"], trials["full@0.02"]]
    assert diverged.status == "ERROR" and "diverged" in diverged.error
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
    run = client.get_run(tracker.find_trial_run(diverged.trial_id))
    assert run.info.status == "FAILED" and "diverged" in run.data.tags[ERROR_TAG]
    assert all(client.get_run(tracker.find_trial_run(t.trial_id)).info.status == "FINISHED" for t in sane)
    parent = client.get_run(tracker.find_sweep())
    assert parent.info.status == "FINISHED"
    summary = (sweep["sweep_dir"] / "report" / "summary.md").read_text()
    assert f"`{diverged.trial_id}` (full): " in summary and "diverged" in summary
    # the console said so as it happened, in one line naming the arm and the reason
    consoles = (sweep["first_output"] + resumed.stdout).splitlines()
    [failed] = [line for line in consoles if line.startswith("failed") and f" {diverged.trial_id} " in line]
    assert "full · training.lr=1e+30: " in failed and "diverged" in failed and len(failed) <= 300
    assert (sweep["sweep_dir"] / "export" / "trial.json").is_file()


def test_the_dora_arm_trains_through_the_sweep_and_exports_merged(sweep, tmp_path):
    spec = load_job(sweep["sweep_dir"] / "job.yaml")
    [dora] = [t for t in load_trials(spec) if arm(t) == "dora@0.02"]
    assert dora.status == "TERMINATED" and dora.metrics["eval/accuracy"] > 0
    out = export_trials(spec, [dora], SweepTracker(spec), out=tmp_path / "dora", merge=True, log=lambda _: None)
    base, _ = load_base_model(spec.model.model_copy(update={"dtype": "float32"}), "cpu")
    adapted = sdt.load(base, dora.checkpoint / ADAPTER_DIR).model.eval()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    tokens = torch.randint(0, 17, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, adapted(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "adapter_config.json").read_text())["sdt"]["lora_variant"] == "dora"


def test_another_spec_under_the_same_name_is_refused_and_changes_nothing(sweep, env):
    sweep_dir = sweep["sweep_dir"]
    before = files_digest(sweep_dir / "export") | {"job.yaml": files_digest(sweep_dir)["job.yaml"]}
    # in this process: refused before anything starts (a subprocess would spend ~10 s importing the stack)
    other = CliRunner().invoke(app, ["sweep", str(sweep["job"]), "--set", "training.lr=0.5"])
    assert other.exit_code == 2, other.output
    assert "holds another sweep" in other.output and "training.lr" in other.output and "sdtune resume" in other.output
    assert not ray.is_initialized()
    after = files_digest(sweep_dir / "export") | {"job.yaml": files_digest(sweep_dir)["job.yaml"]}
    assert after == before
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(sweep_dir)], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr


def test_a_sweep_that_fails_after_validation_says_so_in_one_line(tmp_path, env):
    """Every trial diverges, so nothing can be exported: exit 1, one line (the traceback goes to the sweep
    directory), and the MLflow parent run ends FAILED."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        **JOB, "name": "all-diverge", "output_dir": str(tmp_path / "runs"), "method": {"name": "full"},
        "training": {**JOB["training"], "epochs": 1, "lr": DIVERGING}, "search": {"space": {}},
    }))  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", str(job)], env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sweep failed: NoUsableTrialError: ") and "driver-error.log" in last
    sweep_dir = tmp_path / "runs" / "all-diverge"
    assert "NoUsableTrialError" in (sweep_dir / "driver-error.log").read_text()
    spec = load_job(sweep_dir / "job.yaml")
    assert MlflowClient(tracking_uri(spec)).get_run(SweepTracker(spec).find_sweep()).info.status == "FAILED"
    assert not (sweep_dir / "export").exists()
