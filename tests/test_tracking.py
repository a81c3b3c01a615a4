"""MLflow tracking of a sweep, against real SQLite stores; the last test drives it from a tiny real Ray Tune run."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from ray import cloudpickle

from pipeline.results.tracking import (
    ERROR_TAG,
    PARENT_TAG,
    TRIAL_ID_TAG,
    SweepTracker,
    default_tracking_uri,
    tracking_uri,
)
from pipeline.spec.job import TrialSpecs, parse_job
from pipeline.sweep.callbacks import MLflowSweepCallback

# Every test runs in an empty working directory that must stay empty (no stray ./mlruns).
pytestmark = pytest.mark.usefixtures("clean_cwd")


def make_spec(tmp_path: Path, name: str = "sweep", uri: str | None = None, **sections):
    data = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"builtin": "digits"},
        "search": {"space": {"training.lr": {"loguniform": [1e-4, 1e-2]}}},
        "tracking": {"uri": uri},
        **sections,
    }
    return parse_job(data)


@pytest.fixture
def spec(tmp_path, store):
    return make_spec(tmp_path, uri=store)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = make_spec(tmp_path)
    assert tracking_uri(spec) == f"sqlite:///{(tmp_path / 'runs' / 'sweep').resolve()}/mlflow.db"
    assert tracking_uri(spec) == default_tracking_uri(spec)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/env.db")
    assert tracking_uri(spec) == "sqlite:////elsewhere/env.db"
    assert tracking_uri(make_spec(tmp_path, uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_default_store_and_artifacts_live_in_the_sweep_dir(tmp_path, mlflow_template_db, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = make_spec(tmp_path, name="default-store", tracking={"experiment": "my-exp"})
    sweep_dir = spec.sweep_dir.resolve()
    sweep_dir.mkdir(parents=True)
    shutil.copy(mlflow_template_db, sweep_dir / "mlflow.db")

    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()

    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.name == "my-exp"
    assert experiment.artifact_location == (sweep_dir / "mlartifacts").as_uri()
    assert tracker.client.get_run(parent).data.tags["sdtune.sweep_dir"] == str(sweep_dir)
    job_yaml = Path(tracker.client.download_artifacts(parent, "job.yaml", str(tmp_path)))
    assert job_yaml.read_text() == spec.to_yaml()
    assert list((sweep_dir / "mlartifacts").rglob("job.yaml")), "artifacts belong beside the database"


def test_parent_and_children_are_reused_never_duplicated(spec, store):
    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()
    assert tracker.start_sweep() == parent
    client = MlflowClient(tracking_uri=store)
    params = client.get_run(parent).data.params
    assert "training.lr" not in params  # searched: the winner's value is logged under it at the end
    assert params["training.epochs"] == "3" and params["search.metric"] == "eval/accuracy"
    assert params["search.space.training.lr.loguniform"] == "[0.0001, 0.01]"
    assert client.get_run(parent).data.tags["sdtune.role"] == "sweep"

    first = tracker.trial_run("t_00000", {"training": {"lr": 1e-3}, "method.lora_rank": 4})
    second = tracker.trial_run("t_00001", {"training": {"lr": 1e-2}, "method.lora_rank": 8})
    assert tracker.trial_run("t_00000", {"training": {"lr": 1e-3}, "method.lora_rank": 4}) == first
    tracker.finish_trial("t_00000", "FAILED")
    tracker.finish_sweep("KILLED")

    # A resumed sweep: a new process, a new tracker on the same sweep directory.
    resumed = SweepTracker(spec)
    assert resumed.start_sweep() == parent
    assert client.get_run(parent).info.status == "RUNNING"
    assert resumed.trial_run("t_00000", {"training": {"lr": 1e-3}, "method.lora_rank": 4}) == first
    assert client.get_run(first).info.status == "RUNNING"
    assert resumed.trial_run("t_00002", {}) not in (first, second)

    children = resumed.child_runs()
    by_trial = {}
    for run in children:
        by_trial.setdefault(run.data.tags[TRIAL_ID_TAG], []).append(run.info.run_id)
        assert run.data.tags[PARENT_TAG] == parent
    assert by_trial == {"t_00000": [first], "t_00001": [second], "t_00002": [by_trial["t_00002"][0]]}
    assert client.get_run(first).data.params == {"training.lr": "0.001", "method.lora_rank": "4"}
    runs = client.search_runs([resumed.experiment_id])
    assert len(runs) == 4, "one parent and three children in the experiment"


def test_the_experiment_opens_on_the_training_view_with_the_sweeps_runs_table(spec):
    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.sdtune"])
    assert view["runsExpanded"] == {parent: True}
    assert view["orderByKey"] == "metrics.`eval/accuracy`" and view["orderByAsc"] is False
    assert view["selectedColumns"] == [
        "tags.`sdtune.arm`", "metrics.`eval/accuracy`", "metrics.`test/accuracy`", "metrics.`epochs_reached`",
        "tags.`sdtune.stopped_early`", "params.`training.lr`",
    ]  # fmt: skip
    url = tracker.ui_url("http://127.0.0.1:5000")
    assert url == (f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs"
                   "?workflowType=machine_learning&viewStateShareKey=sdtune")  # fmt: skip


def test_an_experiment_made_before_keeps_a_kind_someone_chose(spec, store):
    client = MlflowClient(tracking_uri=store)
    untagged = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name, experiment_id, kind in (
        ("older", untagged, "custom_model_development"),
        ("chosen", chosen, "genai_development"),
    ):
        SweepTracker(spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"experiment": name})}))
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == kind


def test_the_parent_carries_the_winners_values(spec, store):
    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()
    winner_run = tracker.trial_run("t_1", {"training.lr": 3e-3}, label="sdlora · training.lr=0.003")
    tracker.record_winner(spec.with_overrides({"training.lr": 3e-3}), "t_1", {"eval/accuracy": 0.8, "epoch": 3})
    run = MlflowClient(tracking_uri=store).get_run(parent)
    assert run.data.params["training.lr"] == "0.003" and run.data.params["training.epochs"] == "3"
    assert run.data.metrics == {"eval/accuracy": 0.8, "epoch": 3}
    assert (run.data.tags["sdtune.best_trial_id"], run.data.tags["sdtune.best_run_id"]) == ("t_1", winner_run)
    child = tracker.client.get_run(winner_run)
    assert child.info.run_name == "sdlora · training.lr=0.003 [t_1]"
    assert child.data.tags["sdtune.arm"] == "sdlora · training.lr=0.003"


def test_a_trial_the_scheduler_stopped_says_so(spec):
    tracker = SweepTracker(spec)
    stopped = tracker.trial_run("t_stopped", {}, label="lora")
    full = tracker.trial_run("t_full", {}, label="sdlora")
    tracker.record_trial_end("t_stopped", stopped_early=True, epochs=1, total_epochs=3)
    tracker.record_trial_end("t_full", stopped_early=False, epochs=3, total_epochs=3)
    runs = {run_id: tracker.client.get_run(run_id) for run_id in (stopped, full)}
    assert runs[stopped].data.tags["sdtune.stopped_early"] == "true"
    assert runs[stopped].info.run_name == "lora [t_stopped] · stopped early at epoch 1 of 3"
    assert "ASHA" in runs[stopped].data.tags["mlflow.note.content"]
    assert runs[full].data.tags["sdtune.stopped_early"] == "false" and runs[full].info.run_name == "sdlora [t_full]"
    assert runs[stopped].data.metrics["epochs_reached"] == 1 and runs[full].data.metrics["epochs_reached"] == 3


def test_changed_params_warn_instead_of_failing(spec, caplog):
    tracker = SweepTracker(spec)
    run_id = tracker.trial_run("t", {"lr": 0.1, "note": "x" * 7000, "odd key{}": 1})
    with caplog.at_level(logging.WARNING, logger="pipeline.results.tracking"):
        assert tracker.trial_run("t", {"lr": 0.2, "extra": [1, 2]}) == run_id
    assert "lr" in caplog.text and "immutable" in caplog.text
    params = tracker.client.get_run(run_id).data.params
    assert params["lr"] == "0.1" and params["extra"] == "[1, 2]" and params["odd key__"] == "1"
    assert len(params["note"]) == 6000


def test_metrics_read_back_with_steps(spec):
    tracker = SweepTracker(spec)
    run_id = tracker.trial_run("t", {})
    for step, accuracy in [(0, 0.25), (10, 0.5), (20, 0.75)]:
        tracker.log_metrics(
            "t",
            {"eval/accuracy": accuracy, "train/loss": math.nan, "tokens_per_s": math.inf, "label": "x", "ok": True},
            step=step,
        )
    tracker.log_metrics("t", {"trainable_parameters": 1234}, step=20)
    history = tracker.client.get_metric_history(run_id, "eval/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (10, 0.5), (20, 0.75)]
    tracker.log_metrics("t", {"eval/accuracy": 0.7}, step=20)  # a resumed trial re-sends its last report
    assert tracker.metric_history("t", "eval/accuracy") == [(0, 0.25), (10, 0.5), (20, 0.7)]
    assert tracker.metric_history("no such trial", "eval/accuracy") == []
    # a series of [step, value] pairs (the per-step train loss of one report) lands at the points' own steps
    tracker.log_metrics("t", {"train/step_loss": [[12, 2.0], [14, math.nan], [16, 1.5]], "empty": []}, step=20)
    history = tracker.client.get_metric_history(run_id, "train/step_loss")
    assert sorted((m.step, m.value) for m in history) == [(12, 2.0), (16, 1.5)]
    metrics = {"eval/accuracy", "trainable_parameters", "train/step_loss"}
    assert set(tracker.client.get_run(run_id).data.metrics) == metrics

    # A tracker rebuilt from scratch (or unpickled) finds the child by its tags.
    again = cloudpickle.loads(cloudpickle.dumps(tracker))
    again.log_metrics("t", {"eval/accuracy": 0.9}, step=30)
    assert len(again.client.get_metric_history(run_id, "eval/accuracy")) == 5
    assert len(again.child_runs()) == 1


def test_statuses_and_artifacts(spec, tmp_path):
    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()
    adapter = tmp_path / "ckpt" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    runs = {trial: tracker.trial_run(trial, {}) for trial in ("done", "broken", "stopped", "open")}
    tracker.log_artifacts("done", adapter)
    tracker.finish_trial("done", "FINISHED")
    tracker.finish_trial("broken", "FAILED")
    tracker.finish_trial("stopped", "KILLED")
    with pytest.raises(ValueError, match="status"):
        tracker.finish_trial("open", "DONE")
    with pytest.raises(ValueError, match="status"):
        tracker.finish_sweep("RUNNING")
    tracker.finish_sweep()

    client = tracker.client
    status = {trial: client.get_run(run_id).info.status for trial, run_id in runs.items()}
    assert status == {"done": "FINISHED", "broken": "FAILED", "stopped": "KILLED", "open": "KILLED"}
    assert client.get_run(parent).info.status == "FINISHED"
    listed = sorted(info.path for info in client.list_artifacts(runs["done"], "adapter"))
    assert listed == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    # A SQLite store named in the spec keeps its artifacts beside its database file, not in ./mlruns.
    assert list((tmp_path / "store" / "mlartifacts").rglob("adapter_model.safetensors"))


def test_a_trial_finished_after_its_failure_loses_the_failures_tag(spec):
    tracker = SweepTracker(spec)
    tracker.start_sweep()
    run_id = tracker.trial_run("flaky", {})
    tracker.tag_trial("flaky", {ERROR_TAG: "RuntimeError: a worker died"})
    tracker.finish_trial("flaky", "FAILED")
    resumed = SweepTracker(spec)  # the resumed sweep's command: the same run, found by its tags, runs again
    assert resumed.trial_run("flaky", {}) == run_id
    resumed.finish_trial("flaky", "FINISHED")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and ERROR_TAG not in run.data.tags


def fake_trial(trial_id: str, config: dict | None = None, last_result: dict | None = None):
    return SimpleNamespace(trial_id=trial_id, config=config or {}, last_result=last_result or {}, checkpoint=None)


def test_callback_interrupted_sweep_and_checkpoint_adapter(spec, tmp_path):
    """Tune's interrupt path (Ctrl+C): trials are stopped without on_trial_complete, then on_experiment_end."""
    checkpoint = tmp_path / "trial-a" / "checkpoint_000001"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    callback = MLflowSweepCallback(TrialSpecs(spec), SweepTracker(spec), finish_sweep=True, strict=True)
    callback = cloudpickle.loads(cloudpickle.dumps(callback))  # as Tune stores it in tuner.pkl
    callback.setup()
    a, b = fake_trial("a", {"training.lr": 0.1}), fake_trial("b", {"training.lr": 0.2})
    for trial in (a, b):
        callback.on_trial_start(iteration=1, trials=[a, b], trial=trial)
    result = {
        "eval/accuracy": 0.5,
        "step": 0,
        "training_iteration": 1,
        "checkpoint_path": str(checkpoint),
        "time_total_s": 3.0,
        "config": {"training.lr": 0.1},
        "warmup/loss": 1.5,
        "epoch": 1,
        "batching": "packed",
    }
    callback.on_trial_result(iteration=2, trials=[a, b], trial=a, result=result)
    a.last_result = result  # as Tune keeps it
    callback.on_trial_result(
        iteration=2, trials=[a, b], trial=b, result={"eval/accuracy": 0.1, "training_iteration": 3}
    )
    callback.on_trial_complete(iteration=3, trials=[a, b], trial=a)
    callback.on_experiment_end(trials=[a, b])

    tracker = callback.tracker
    runs = {run.data.tags[TRIAL_ID_TAG]: run for run in tracker.child_runs()}
    assert {trial: run.info.status for trial, run in runs.items()} == {"a": "FINISHED", "b": "KILLED"}
    assert set(runs["a"].data.metrics) == {"eval/accuracy", "warmup/loss", "epoch", "epochs_reached"}
    # its last report is of epoch 1 of 3: the scheduler stopped it
    assert runs["a"].data.tags["sdtune.stopped_early"] == "true" and "sdtune.stopped_early" not in runs["b"].data.tags
    assert runs["a"].data.tags["sdtune.arm"] == "sdlora · training.lr=0.1"
    assert runs["a"].data.tags["sdtune.batching"] == "packed" and "sdtune.batching" not in runs["b"].data.tags
    assert [m.step for m in tracker.client.get_metric_history(runs["b"].info.run_id, "eval/accuracy")] == [3]
    listed = [info.path for info in tracker.client.list_artifacts(runs["a"].info.run_id, "adapter")]
    assert listed == ["adapter/adapter_model.safetensors"]
    assert tracker.client.get_run(tracker.parent_run_id).info.status == "KILLED"


def report_of(step: int, accuracy: float) -> dict:
    """A worker's report at the end of an epoch of 20 steps, with its step losses (logged every 10 steps)."""
    losses = [[step - 10, 3.0 - step / 100], [step, 2.9 - step / 100]]
    return {"step": step, "epoch": step // 20, "eval/accuracy": accuracy, "train/step_loss": losses, "node_id": "n"}


def test_a_resumed_trial_brings_the_reports_of_its_checkpoints_once(spec):
    """The sweep stopped as trial a made its second report: Tune had stopped taking results, so only the first
    reached MLflow, and the second lives in its checkpoint. The resumed sweep's callback logs it when the trial
    starts again (the first, which its run holds, not again); the trial then trains on from it and reports, and
    a report sent again (a finished trial's last, on resume) adds nothing."""
    first = SweepTracker(spec)
    first.trial_run("a", {})
    first.log_report("a", report_of(20, 0.25), 20)
    trial_dir = spec.sweep_dir.resolve() / "trial-a"
    for name, report in (("checkpoint_1", report_of(20, 0.25)), ("checkpoint_2", report_of(40, 0.5))):
        (trial_dir / name).mkdir(parents=True)
        (trial_dir / name / "trainer_state.json").write_text(json.dumps({"step": report["step"], "metrics": report}))
    (trial_dir / "checkpoint_3").mkdir()
    (trial_dir / "checkpoint_3" / "trainer_state.json").write_text('{"step": 6')  # cut short by the stop

    callback = MLflowSweepCallback(TrialSpecs(spec), SweepTracker(spec), strict=True)
    callback = cloudpickle.loads(cloudpickle.dumps(callback))  # the resumed driver's, restored from tuner.pkl
    callback.setup()
    trial = fake_trial("a", last_result={**report_of(20, 0.25), "training_iteration": 1})
    callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    callback.on_trial_result(iteration=2, trials=[trial], trial=trial, result=report_of(60, 0.75))
    callback.on_trial_result(iteration=3, trials=[trial], trial=trial, result=report_of(60, 0.75))

    run_id = first.find_trial_run("a")
    history = first.client.get_metric_history(run_id, "eval/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(20, 0.25), (40, 0.5), (60, 0.75)]
    losses = first.client.get_metric_history(run_id, "train/step_loss")
    assert sorted(m.step for m in losses) == [10, 20, 30, 40, 50, 60]


# ---- a real Ray Tune run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_tune_run_gives_one_child_per_trial(ray_session, spec, tmp_path):
    from ray import tune

    def trainable(config):
        import tempfile

        for i in range(3):
            x = config["training.seed"]
            if x == 3 and i == 2:
                raise RuntimeError("this trial fails")
            metrics = {"eval/accuracy": x * (i + 1) / 10, "step": 10 * i, "epoch": i + 1, "train/loss": 1.0, "junk": 1}
            if i == 2:  # a final checkpoint with an adapter/ folder, as pipeline.trial.worker writes
                with tempfile.TemporaryDirectory() as tmp:
                    os.makedirs(os.path.join(tmp, "adapter"))
                    with open(os.path.join(tmp, "adapter", "adapter_config.json"), "w") as f:
                        f.write("{}")
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(metrics)

    tracker = SweepTracker(spec)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.5}),
        param_space={"training.seed": tune.grid_search([1, 2, 3]), "method": {"name": "lora", "lora_rank": 4}},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(
            name="tiny",
            storage_path=str(tmp_path / "ray"),
            callbacks=[MLflowSweepCallback(TrialSpecs(tracker.spec), tracker, strict=True)],
            verbose=0,
        ),
    )
    results = tuner.fit()
    assert sum(result.error is not None for result in results) == 1

    children = tracker.child_runs()
    assert len(children) == 3 == len({run.data.tags[TRIAL_ID_TAG] for run in children})
    client = tracker.client
    by_x = {run.data.params["training.seed"]: run for run in children}
    assert set(by_x) == {"1", "2", "3"}
    assert all(run.data.params["method.lora_rank"] == "4" for run in children)  # a nested value, flattened
    assert all(run.data.tags["sdtune.arm"] == f"lora r4 · training.seed={x}" for x, run in by_x.items())
    # three epochs each: trained to the end (the failed one never completed)
    assert [by_x[x].data.tags.get("sdtune.stopped_early") for x in "123"] == ["false", "false", None]
    assert {x: run.info.status for x, run in by_x.items()} == {"1": "FINISHED", "2": "FINISHED", "3": "FAILED"}
    for x, run in by_x.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/accuracy"))
        steps = [0, 10, 20] if x != "3" else [0, 10]
        assert history == [(step, pytest.approx(int(x) * (step // 10 + 1) / 10)) for step in steps]
        assert "junk" not in run.data.metrics
    assert [info.path for info in client.list_artifacts(by_x["1"].info.run_id, "adapter")] == [
        "adapter/adapter_config.json"
    ]
    assert client.get_run(tracker.parent_run_id).info.status == "RUNNING"  # the caller finishes the sweep
