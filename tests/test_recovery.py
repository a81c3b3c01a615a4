"""What faults leave behind, on small CPU sweeps run as a person runs them: real Ray, DeepSpeed and MLflow, real
signals and processes (tests/processes.py).

- Ctrl+C (SIGINT to the command's process group) right after a trial's second evaluation, then ``sdtune resume``:
  MLflow holds each evaluation and each step loss of the trial once, the reports made while the sweep stopped
  included, and the report reads each evaluation at its epoch.
- A trial whose worker is killed (``training.max_failures: 0``) fails, and so does one whose loss diverges: the sweep
  fails with nothing to export, each failure one console line, every trace in ``logs/``. ``sdtune resume`` finishes
  the killed trial while the model registry is down: the sweep finishes, exported and reported, with one warning
  line; no trace of the recovered failure is left, and MLflow, Tune and the report agree on every trial's status.
- A refused ``sdtune export`` writes nothing, not even the sweep's lock file.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow import MlflowClient
from processes import failure, free_port, sdtune, train_workers, wait_for
from typer.testing import CliRunner

from pipeline.cli.commands import app
from pipeline.results.outcomes import checkpoint_reports, load_trials
from pipeline.results.tracking import ERROR_TAG, SweepTracker, tracking_uri
from pipeline.spec.job import load_job
from pipeline.storage.layout import REPORTS_KEY

SAMPLES, BATCH = 160, 8
STEPS_PER_EPOCH = SAMPLES // BATCH
JOB = {
    "model": {"builtin": "digits"},
    "data": {"task": "digits", "max_train_samples": SAMPLES, "max_eval_samples": 40},
    "method": {"name": "lora", "lora_rank": 4, "lora_targets": ["x_proj", "dt_proj", "out_proj"]},
    "training": {"epochs": 4, "batch_size": BATCH, "lr": 1e-2, "eval_batch_size": 40},  # step loss every 10 steps
    "resources": {"num_workers": 1, "cpus_per_worker": 1, "trial_cpus": 0.25, "max_concurrent_trials": 1},
    "search": {"metric": "eval/accuracy", "mode": "max", "space": {}},
    "export": {"merge": False, "register_model": False},
}
SANE, DIVERGING = 1e-2, 1e30
# What Ray and Ray Tune print of a failure: tracebacks, Tune's "Trial task failed" and "Trials did not complete"
# records, the raylet's message of a dead worker.
CONSOLE_NOISE = ("Traceback", "tune_controller", "Trials did not complete", "(raylet)", "A worker died")


@pytest.fixture(scope="module")
def env(digits_cache):
    return {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}


def write_job(root: Path, name: str, **sections) -> Path:
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, **sections, "name": name, "output_dir": str(root / "runs")}))
    return job


def start(args: list[str], env: dict, console: Path) -> subprocess.Popen:
    """``sdtune ARGS`` in its own process group (as a terminal runs it), its output in the file ``console``."""
    with console.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli.commands", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def wait_for_line(process: subprocess.Popen, console: Path, text: str) -> None:
    wait_for(lambda: text in console.read_text() or process.poll() is not None, 600, repr(text))
    assert process.poll() is None, f"the command ended before {text!r}:\n{console.read_text()[-3000:]}"


def raw_history(spec, trial_id: str, key: str) -> list[tuple[int, float]]:
    """Every point MLflow holds for the trial's ``key``, duplicates included, by step."""
    tracker = SweepTracker(spec)
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.find_trial_run(trial_id), key))


def state_of(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory`` (the lock file too) with its modification time and bytes."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Ctrl+C, then resume


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, env):
    """One trial of 4 epochs; SIGINT to the sweep as its console shows the second evaluation; then resume."""
    root = tmp_path_factory.mktemp("interrupted")
    job, sweep_dir, console = write_job(root, "interrupted"), root / "runs" / "interrupted", root / "first.txt"
    sweep = start(["sweep", str(job)], env, console)
    wait_for_line(sweep, console, ": epoch 2/4, ")
    os.killpg(sweep.pid, signal.SIGINT)
    code = sweep.wait(timeout=600)
    spec = load_job(sweep_dir / "job.yaml")
    [trial] = load_trials(spec)
    # what the interrupted sweep left: the reports MLflow got, and those its trial's checkpoints hold
    logged = raw_history(spec, trial.trial_id, "eval/accuracy")
    saved = checkpoint_reports(spec, trial.trial_id)
    resumed = sdtune("resume", str(sweep_dir), env=env)
    return SimpleNamespace(sweep_dir=sweep_dir, spec=spec, trial_id=trial.trial_id, code=code,
                           first=console.read_text(), logged=logged, saved=saved, resumed=resumed)  # fmt: skip


def test_ctrl_c_then_resume_leaves_every_evaluation_and_step_loss_in_mlflow_once(interrupted):
    assert interrupted.code == 130, interrupted.first[-3000:]
    assert interrupted.resumed.returncode == 0, failure(interrupted.resumed)
    spec, trial_id = interrupted.spec, interrupted.trial_id
    evaluations = raw_history(spec, trial_id, "eval/accuracy")
    assert [step for step, _ in evaluations] == [epoch * STEPS_PER_EPOCH for epoch in (1, 2, 3, 4)]
    assert [step for step, _ in raw_history(spec, trial_id, "epoch")] == [step for step, _ in evaluations]
    assert [step for step, _ in raw_history(spec, trial_id, "train/step_loss")] == list(range(10, 81, 10))
    # the reports saved with the checkpoints the interrupted sweep left, those made while it stopped included (which
    # MLflow lacked until the resume), in MLflow as they were made
    assert {STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH} <= {step for step, _ in interrupted.logged}  # as the console said
    value_at = dict(evaluations)
    for report in interrupted.saved:
        assert value_at[report["step"]] == report["eval/accuracy"]
    [trial] = load_trials(spec)
    assert (trial.status, trial.metrics["epoch"], trial.metrics["step"]) == ("TERMINATED", 4, 4 * STEPS_PER_EPOCH)
    # Tune's training_iteration began again with the restarted trial; ASHA's time counts on from its checkpoint
    assert trial.metrics[REPORTS_KEY] == 4 and trial.metrics["training_iteration"] < 4
    assert not any(noise in interrupted.resumed.stdout + interrupted.resumed.stderr for noise in CONSOLE_NOISE)


def test_the_report_reads_the_resumed_trials_evaluations_at_their_epochs(interrupted):
    evaluations = dict(raw_history(interrupted.spec, interrupted.trial_id, "eval/accuracy"))
    with (interrupted.sweep_dir / "report" / "summary.csv").open(newline="") as file:
        [row] = csv.DictReader(file)
    assert float(row["eval/accuracy after 4 epochs mean"]) == evaluations[4 * STEPS_PER_EPOCH]


# ---------------------------------------------------------------------------------------------------------------
# A killed worker and a diverged loss, then resume with the model registry down


@pytest.fixture(scope="module")
def recovered(tmp_path_factory, env):
    """Two trials of 3 epochs, one at a time, none retried: the first's worker is killed after its first
    evaluation, the second diverges at once. Then resume, with the MLflow model registry unreachable (a registry
    server that is down: nothing listens at its address, and MLflow tries once)."""
    root = tmp_path_factory.mktemp("recovered")
    training = {**JOB["training"], "epochs": 3, "max_failures": 0}
    search = {**JOB["search"], "space": {"training.lr": {"grid": [SANE, DIVERGING]}}}
    export = {"merge": False, "register_model": True}
    job = write_job(root, "recovered", training=training, search=search, export=export)
    sweep_dir, console = root / "runs" / "recovered", root / "first.txt"
    registry_down = {"MLFLOW_REGISTRY_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    sweep = start(["sweep", str(job)], {**env, **registry_down}, console)
    wait_for_line(sweep, console, ": epoch 1/3, ")
    [worker] = wait_for(lambda: train_workers(sweep.pid), 60, "the trial's worker")
    worker.kill()
    code = sweep.wait(timeout=900)
    error_log = sweep_dir / "driver-error.log"
    failed_run = error_log.read_text() if error_log.is_file() else None
    before = state_of(sweep_dir)
    nothing = CliRunner().invoke(app, ["export", str(sweep_dir)])  # in this process: refused before anything starts
    untouched = state_of(sweep_dir) == before
    resumed = sdtune("resume", str(sweep_dir), env={**env, **registry_down})
    spec = load_job(sweep_dir / "job.yaml")
    trials = {trial.config["training.lr"]: trial for trial in load_trials(spec)}
    return SimpleNamespace(sweep_dir=sweep_dir, spec=spec, killed=trials[SANE], diverged=trials[DIVERGING],
                           code=code, first=console.read_text(), failed_run=failed_run, nothing=nothing,
                           untouched=untouched, resumed=resumed)  # fmt: skip


def test_each_failure_is_one_console_line_and_its_trace_is_in_logs(recovered):
    assert recovered.code == 1, recovered.first[-3000:]
    lines = recovered.first.splitlines()
    assert lines[-1].startswith("sweep failed: NoUsableTrialError: ")
    logs = recovered.sweep_dir / "logs"
    for trial in (recovered.killed, recovered.diverged):
        [line] = [line for line in lines if f" {trial.trial_id} " in line and line.startswith("failed")]
        assert line.endswith(f"(full trace in {logs / 'driver.log'})") and len(line) <= 300
    [diverged] = [line for line in lines if line.startswith(f"failed    {recovered.diverged.trial_id} ")]
    assert "diverged: the training loss is" in diverged
    assert not any(noise in recovered.first for noise in CONSOLE_NOISE), recovered.first
    driver_log, workers_log = (logs / "driver.log").read_text(), (logs / "workers.log").read_text()
    for trial in (recovered.killed, recovered.diverged):
        assert f"Trial task failed for trial trial_driver_{trial.trial_id}" in driver_log
    assert "Traceback (most recent call last)" in driver_log and "TrialDiverged" in driver_log
    assert "(raylet) A worker died or was killed" in workers_log


def test_a_resumed_failure_leaves_no_trace_and_every_status_agrees(recovered):
    assert recovered.resumed.returncode == 0, failure(recovered.resumed)
    sweep_dir, spec = recovered.sweep_dir, recovered.spec
    killed, diverged = recovered.killed, recovered.diverged
    assert (killed.status, killed.error, killed.metrics["epoch"]) == ("TERMINATED", None, 3)  # Tune's
    assert diverged.status == "ERROR" and "diverged" in diverged.error
    tracker = SweepTracker(spec)
    client = MlflowClient(tracking_uri(spec))
    killed_run = client.get_run(tracker.find_trial_run(killed.trial_id))
    assert killed_run.info.status == "FINISHED" and ERROR_TAG not in killed_run.data.tags
    diverged_run = client.get_run(tracker.find_trial_run(diverged.trial_id))
    assert diverged_run.info.status == "FAILED" and "diverged" in diverged_run.data.tags[ERROR_TAG]
    assert client.get_run(tracker.find_sweep()).info.status == "FINISHED"
    with (sweep_dir / "report" / "trials.csv").open(newline="") as file:
        statuses = {row["trial_id"]: (row["status"], bool(row["error"])) for row in csv.DictReader(file)}
    assert statuses == {killed.trial_id: ("TERMINATED", False), diverged.trial_id: ("ERROR", True)}
    summary = (sweep_dir / "report" / "summary.md").read_text()
    failed_section = summary.split("## Failed trials")[1].split("##")[0]
    assert diverged.trial_id in failed_section and killed.trial_id not in failed_section
    # the failed run's traceback: kept in logs/, named by when it was written, not beside the sweep
    assert "NoUsableTrialError" in recovered.failed_run and not (sweep_dir / "driver-error.log").exists()
    [archived] = (sweep_dir / "logs").glob("driver-error-*.log")
    assert archived.read_text() == recovered.failed_run
    steps = [step for step, _ in raw_history(spec, killed.trial_id, "eval/accuracy")]
    assert steps == [epoch * STEPS_PER_EPOCH for epoch in (1, 2, 3)]


def test_a_registry_that_is_down_leaves_the_sweep_finished_exported_and_reported(recovered):
    assert recovered.resumed.returncode == 0, failure(recovered.resumed)
    export = recovered.sweep_dir / "export"
    record = json.loads((export / "trial.json").read_text())
    assert record["trial_id"] == recovered.killed.trial_id and record["mlflow"]["registered_model"] is None
    assert (export / "adapter_model.safetensors").is_file() and "models:/" not in (export / "README.md").read_text()
    assert (recovered.sweep_dir / "report" / "summary.md").is_file()
    console = (recovered.resumed.stdout + recovered.resumed.stderr).splitlines()
    [warning] = [line for line in console if "registered" in line]
    assert warning.startswith(f"{export} is written, but not registered in MLflow: MlflowException: ")
    assert warning.endswith(f"(traceback in {recovered.sweep_dir / 'logs' / 'driver.log'})") and len(warning) <= 300
    assert f"exported to {export}" in console and not any("Traceback" in line for line in console)


# ---------------------------------------------------------------------------------------------------------------
# Refused commands


def test_the_export_of_a_sweep_with_nothing_to_export_is_refused_and_writes_nothing(recovered):
    assert recovered.nothing.exit_code == 2 and recovered.untouched
    assert recovered.nothing.output.startswith(f"{recovered.sweep_dir}: nothing to export: no finished trial with ")
    assert recovered.nothing.output.count("\n") == 1


def test_a_refused_export_writes_nothing(recovered, interrupted, tmp_path):
    """``--out`` at a file, and at another sweep's export: one line naming the field, exit 2, not a byte written
    in either sweep (their lock files included)."""
    a_file = tmp_path / "adapter"
    a_file.write_text("someone's file")
    before = {path: state_of(path) for path in (recovered.sweep_dir, interrupted.sweep_dir)}

    onto_a_file = CliRunner().invoke(app, ["export", str(recovered.sweep_dir), "--out", str(a_file)])
    onto_another = CliRunner().invoke(app, ["export", str(recovered.sweep_dir), "--out",
                                            str(interrupted.sweep_dir / "export")])  # fmt: skip

    assert onto_a_file.exit_code == 2
    assert (
        onto_a_file.output == f"--out: {a_file} exists and is not an sdtune export: choose another --out / export.dir\n"
    )
    assert onto_another.exit_code == 2 and onto_another.output.count("\n") == 1
    assert f"is the export of the sweep {interrupted.sweep_dir}, not of {recovered.sweep_dir}" in onto_another.output
    assert {path: state_of(path) for path in before} == before
    assert a_file.read_text() == "someone's file"
