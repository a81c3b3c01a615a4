"""One trial end to end on CPU: `sdtune train` runs 2 DeepSpeed ZeRO-2 workers under Ray Train on the built-in
digits task with SDLoRA from the pretrained tiny base. One of its workers is killed once two checkpoints are kept,
and the newer ones are damaged while the worker group is down: the trial resumes by itself from the one before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from processes import train_workers, wait_for
from safetensors.torch import load_file

from pipeline.spec.job import load_job
from pipeline.tasks.metrics import evaluate
from pipeline.tasks.sources import load_task
from pipeline.trial.models import load_base_model

JOB = {
    "name": "digits-trial",
    "model": {"builtin": "digits"},
    "data": {"task": "digits", "max_train_samples": 480, "max_eval_samples": 120},
    "method": {"name": "sdlora", "channels_frozen": 0.9, "warmup_steps": 10},
    # an evaluation every half epoch, so one falls on each epoch's last step (once reported twice, the second with
    # no training loss): the epoch's report is the only one there
    "training": {
        "epochs": 3,
        "batch_size": 8,
        "lr": 2e-2,
        "zero_stage": 2,
        "eval_batch_size": 32,
        "eval_every_steps": 15,
    },
    "resources": {"num_workers": 2, "cpus_per_worker": 1},
}
STEPS_PER_EPOCH = 480 // (8 * 2)


@pytest.fixture(scope="module")
def cache_env(digits_cache):
    """The environment of the `sdtune` subprocesses: the session's digits cache, Ray without its auth token file."""
    return {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}


def printed(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def write_job(directory: Path, **changes) -> Path:
    job = {**JOB, "output_dir": str(directory / "runs"), **changes}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def registered_checkpoints(runs: Path) -> list[Path]:
    """The checkpoints Ray Train has registered for the trial under ``runs``, oldest first (its checkpoint manager's
    snapshot, rewritten after each report)."""
    for snapshot in runs.glob("**/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # caught mid-write
            return []
        return [snapshot.parent / result["checkpoint_dir_name"] for result in results]
    return []


@pytest.fixture(scope="module")
def resumed_trial(tmp_path_factory, cache_env):
    """The trial run once, with SIGKILL of a worker once Ray keeps two checkpoints (as an out-of-memory kill would
    take it). While the worker group is down, every kept checkpoint but the oldest gets its adapter truncated (as a
    full disk would leave it): Ray Train restarts the group from its latest checkpoint (training.max_failures), the
    run finds it unreadable, falls back to the oldest, and ends as an uninterrupted run does. One run serves the
    tests below (a trial costs about a minute of Ray on 2 cores)."""
    directory = tmp_path_factory.mktemp("trial")
    job = write_job(directory)
    out, err = directory / "stdout.log", directory / "stderr.log"
    with out.open("w") as stdout, err.open("w") as stderr:  # files, not pipes: nothing blocks the trial's output
        trial = subprocess.Popen([sys.executable, "-m", "pipeline.cli.commands", "train", str(job)], env=cache_env,
                                 stdout=stdout, stderr=stderr)  # fmt: skip
        wait_for(lambda: len(registered_checkpoints(directory / "runs")) >= 2, 600, "two checkpoints")
        [victim, *_] = wait_for(lambda: train_workers(trial.pid), 60, "the train workers")
        victim.kill()
        # Read after the kill: the surviving rank cannot finish another step or checkpoint without its peer, so
        # nothing is reported until the restarted group has restored one.
        latest = registered_checkpoints(directory / "runs")[-1]
        oldest, *newer = sorted(path for path in latest.parent.glob("checkpoint_*") if path.is_dir())
        assert latest in newer
        for checkpoint in newer:
            weights = checkpoint / "adapter" / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        restored_step = json.loads((oldest / "trainer_state.json").read_text())["step"]
        assert trial.wait(timeout=900) == 0, out.read_text()[-3000:] + err.read_text()[-5000:]
    stdout_text = out.read_text()
    return directory, printed(stdout_text), stdout_text + err.read_text(), latest, restored_step


def test_sdlora_trial_learns_and_checkpoints(resumed_trial):
    directory, metrics, *_ = resumed_trial
    assert int(metrics["step"]) == 3 * STEPS_PER_EPOCH and int(metrics["epoch"]) == 3
    assert float(metrics["train/loss"]) > 0 and float(metrics["tokens_per_s"]) > 0  # a report with training in it
    assert float(metrics["warmup/steps"]) == 10
    checkpoint = Path(metrics["checkpoint"])
    assert checkpoint.is_dir()

    # the frozen pretrained base, scored by the same code on the same validation split
    spec = load_job(directory / "job.yaml")
    base, tokenizer = load_base_model(spec.model, torch.device("cpu"))
    frozen = evaluate(base, load_task(spec.data, tokenizer), "validation", tokenizer, spec.data, batch_size=32)
    tuned_accuracy, tuned_loss = float(metrics["eval/accuracy"]), float(metrics["eval/loss"])
    assert tuned_accuracy >= frozen["accuracy"] + 0.3, (frozen, metrics)
    assert tuned_loss < 0.5 * frozen["loss"], (frozen, metrics)

    # the checkpoint holds the adapter with its selection, and where to resume
    adapter = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert any(k.startswith("sdt_selection.") for k in adapter)
    assert "sdt_sparse.A_log.delta" in adapter
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 3 * STEPS_PER_EPOCH
    assert (checkpoint / "engine" / "state").is_dir()


def test_a_killed_worker_resumes_its_trial_by_itself_from_its_last_readable_checkpoint(resumed_trial):
    """The worker was killed part-way (two checkpoints in, before the last step), the newer checkpoints were
    damaged, and the run still ended at its last step, from the oldest one, with its selection and warmup."""
    directory, metrics, output, latest, restored_step = resumed_trial
    assert 0 < restored_step < int(metrics["step"]) == 3 * STEPS_PER_EPOCH
    # on the console and in the log: the checkpoint's whole path, then the reason as far as the line holds
    warning = f"WARNING: checkpoint {latest} cannot be restored, trying the one before it: adapter/adapter_model"
    assert output.count(warning) == 1  # rank 0's line, not one per rank
    # the worker's death: one line of sdtune's on the console (Ray's own goes to logs/workers.log)
    [restart] = [line for line in output.splitlines() if "Ray Train restarts its workers" in line]
    assert restart.startswith("WARNING: train: rank ") and "(restart 1 of 2; " in restart and len(restart) <= 300
    assert "(raylet)" not in output
    [workers_log] = (directory / "runs").glob("**/logs/workers.log")
    assert warning in workers_log.read_text()
    # every checkpoint kept at the end (the damaged ones were replaced) holds the same selection
    adapters = [load_file(p) for p in sorted((directory / "runs").glob("**/adapter/adapter_model.safetensors"))]
    assert len(adapters) >= 2
    selection_keys = [k for k in adapters[0] if k.startswith("sdt_selection.")]
    assert selection_keys and all(torch.equal(a[k], adapters[0][k]) for a in adapters for k in selection_keys)
    assert "warmup/loss" in metrics  # carried over from the restored checkpoint, not recomputed


def test_batches_count_the_pad_positions_of_the_batches_they_hand_out():
    """Seven rows of 6 tokens and one of 2, in two batches of 4 padded to 6: 48 positions, 44 of them tokens. A
    batch counts when it is handed out, not when it is prepared (one ahead): after the first, 24 positions."""
    from pipeline.tasks.formatting import Example
    from pipeline.trial.worker import Batches

    rows = [Example(prompt_ids=[1] * 4, answer_ids=[2, 2], reference=0) for _ in range(7)]
    rows.append(Example(prompt_ids=[1], answer_ids=[2], reference=0))
    batches = Batches(rows, batch_size=4, seed=0, rank=0, world=1, pad_id=0)
    epoch = batches.epoch(0, torch.device("cpu"))
    next(epoch)
    assert batches.positions == 24 and batches.tokens in (20, 24)  # the short row is in the first batch or not
    list(epoch)
    assert (batches.positions, batches.tokens) == (48, 44)
    assert batches.padding_since(0, 0) == pytest.approx(4 / 48)
    assert batches.padding_since(48, 44) == 0.0  # nothing handed out since
