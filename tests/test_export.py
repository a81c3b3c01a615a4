"""The export stage on real adapters of the builtin digits base and a real SQLite MLflow store, without Ray: the
trials are built as :func:`pipeline.results.outcomes.load_trials` would read them back from a sweep."""

from __future__ import annotations

import json
import logging
import math
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import sdt
from pipeline.results import export
from pipeline.results.export import ExportRefused, export_trials
from pipeline.results.outcomes import NoUsableTrialError, TrialOutcome
from pipeline.results.tracking import CHAMPION_ALIAS, SweepTracker, tracking_uri
from pipeline.spec.job import JobSpec, parse_job
from pipeline.storage.layout import ADAPTER_DIR, TRAINER_STATE
from pipeline.tasks.digits import SHIPPED_BASE, digits_pixel_sequences, digits_tokenizer
from pipeline.trial.models import load_base_model
from pipeline.trial.worker import ENGINE_DIR

CONTRACT = {"adapter_model.safetensors", "adapter_config.json", "trial.json", "job.yaml", "README.md"}
WINNER = "t_best"


def silent(_: str) -> None:
    pass


def make_spec(root: Path, tracking: dict | None = None, **export_section) -> JobSpec:
    return parse_job(
        {
            "name": "digits-export",
            "output_dir": str(root / "runs"),
            "model": {"builtin": "digits"},
            "method": {"name": "sdlora", "channels_frozen": 0.9, "warmup_steps": 2},
            "search": {
                "metric": "eval/accuracy",
                "mode": "max",
                "space": {"training.lr": {"choice": [1e-3, 1e-2]}, "method.lora_rank": {"choice": [2, 4]}},
            },
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", **(tracking or {})},
            "export": export_section,
        }
    )


def fp32_base(spec: JobSpec) -> torch.nn.Module:
    model, _ = load_base_model(spec.model.model_copy(update={"dtype": "float32"}), "cpu", log=silent)
    return model


def optimizer_steps(tuner: sdt.Tuner, steps: int, lr: float) -> None:
    pixels = torch.tensor(digits_pixel_sequences("train")[:8])
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=lr)
    tuner.model.train()
    for _ in range(steps):
        tuner.model(input_ids=pixels, labels=pixels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tuner.model.eval()


def write_checkpoint(spec: JobSpec, config: dict, directory: Path) -> Path:
    """A trial checkpoint as the trainer leaves it, with a real adapter: warmup, selection, a few training steps."""
    trial_spec = spec.with_overrides(config)
    lr = trial_spec.training.lr
    tuner = sdt.apply(fp32_base(trial_spec), trial_spec.method.to_sdt_config(seed=trial_spec.training.seed))
    optimizer_steps(tuner, trial_spec.method.warmup_steps, lr)
    tuner.start_training(tuner.select())
    optimizer_steps(tuner, 2, lr)  # LoRA B and the sparse deltas leave zero
    sdt.save(tuner, directory / ADAPTER_DIR)
    (directory / TRAINER_STATE).write_text(json.dumps({"step": 2, "epoch": 1, "next_batch": 0, "warmup": {}}))
    (directory / ENGINE_DIR).mkdir()
    return directory


def outcome(spec: JobSpec, trial_id: str, status: str, config: dict, accuracy: float, checkpoint: Path) -> TrialOutcome:
    report = {
        "eval/accuracy": accuracy,
        "train/loss": 0.5,
        "step": 2,
        "epoch": 1,
        **({"test/accuracy": accuracy - 0.1} if math.isfinite(accuracy) else {}),
        "checkpoint_path": str(checkpoint),
        "pid": 1234,  # Ray's bookkeeping, which trial.json leaves out
        "timestamp": 1700000000,
    }
    return TrialOutcome(trial_id, status, config, report, spec.with_overrides(config))


@pytest.fixture(scope="module")
def sweep(digits_cache, tmp_path_factory) -> SimpleNamespace:
    """Four trials (a loser, the winner, a NaN and a failed one with the highest accuracy) with their MLflow runs."""
    root = tmp_path_factory.mktemp("export")
    spec = make_spec(root)
    low, best = {"training.lr": 1e-3, "method.lora_rank": 2}, {"training.lr": 1e-2, "method.lora_rank": 4}
    low_checkpoint = write_checkpoint(spec, low, root / "checkpoints" / "t_low")
    best_checkpoint = write_checkpoint(spec, best, root / "checkpoints" / WINNER)
    trials = [
        ("t_low", "TERMINATED", low, 0.55, low_checkpoint),
        (WINNER, "TERMINATED", best, 0.8, best_checkpoint),
        ("t_nan", "TERMINATED", low, math.nan, low_checkpoint),
        ("t_failed", "ERROR", low, 0.99, low_checkpoint),
    ]
    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()
    runs = {trial_id: tracker.trial_run(trial_id, config) for trial_id, _, config, _, _ in trials}
    return SimpleNamespace(root=root, raw_trials=trials, runs=runs, parent=parent, best_checkpoint=best_checkpoint)


def trials_of(sweep: SimpleNamespace, spec: JobSpec) -> list[TrialOutcome]:
    """The sweep's trials as a sweep with ``spec`` (whose export section the test chose) records them."""
    return [outcome(spec, *raw) for raw in sweep.raw_trials]


def run_export(spec: JobSpec, trials: list[TrialOutcome], **options) -> Path:
    return export_trials(spec, trials, SweepTracker(spec), log=options.pop("log", silent), **options)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def test_export_writes_the_contract(sweep, digits_cache):
    spec = make_spec(sweep.root, registered_model_name="digits-adapter")
    lines: list[str] = []
    out = run_export(spec, trials_of(sweep, spec), merge=True, log=lines.append)

    assert out == spec.sweep_dir / "export"
    assert {path.name for path in out.iterdir()} == CONTRACT | {"merged"}
    assert any(str(out) in line for line in lines) and any("0.8" in line for line in lines)

    # the winner's adapter, tensor for tensor
    exported = load_file(out / "adapter_model.safetensors")
    trained = load_file(sweep.best_checkpoint / ADAPTER_DIR / "adapter_model.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[key], trained[key]) for key in trained)

    config = sdt.read_config(out)
    trained_config = sdt.read_config(sweep.best_checkpoint / ADAPTER_DIR)
    assert config["method"] == "sdlora"
    assert config["ranks"] == {"lora_rank": 4, "lora_alpha": 8.0}
    assert config["ratios"] == {"channels_frozen": 0.9, "states_frozen": None, "inputs_frozen": None}  # None: default
    assert config["targets"] == {"lora": ["out_proj"], "sdt": ["A_log", "B", "C"]}
    # 128 channels, 0.9 frozen: 13 kept; 8 states, the default 0.75 frozen: 2 kept per channel; in both layers
    assert config["selected"] == {
        layer: {"channels": 13, "states_per_channel": 2} for layer in trained_config["selected"]
    }
    assert {shapes["states"][0] for shapes in trained_config["selected"].values()} == {13}  # sdt.save's shapes
    assert "sdt_selection.<layer>.<axis>" in config["selected_indices"]
    assert config["base_model"] == str(SHIPPED_BASE)
    assert config["base_model_source"] == {"builtin": "digits"}
    assert config["sdtune_version"] == version("sdtune")
    assert config["num_trainable_parameters"] == trained_config["num_trainable_parameters"]

    record = json.loads((out / "trial.json").read_text())
    assert record["trial_id"] == WINNER
    assert record["hyperparameters"] == {"training.lr": 1e-2, "method.lora_rank": 4}
    assert record["metrics"] == {
        "eval/accuracy": 0.8,
        "test/accuracy": pytest.approx(0.7),
        "train/loss": 0.5,
        "step": 2,
        "epoch": 1,
    }
    assert (record["metric"], record["mode"], record["value"]) == ("eval/accuracy", "max", 0.8)
    assert record["checkpoint"] == str(sweep.best_checkpoint)
    assert record["mlflow"]["run_id"] == sweep.runs[WINNER]
    assert record["mlflow"]["parent_run_id"] == sweep.parent

    job = parse_job(yaml.safe_load((out / "job.yaml").read_text()))
    assert (job.training.lr, job.method.lora_rank) == (1e-2, 4)

    card = (out / "README.md").read_text()
    assert all(
        text in card for text in ("eval/accuracy", WINNER, "sdt.load", "merged", "test score: test/accuracy **0.7**")
    )
    assert "`training.lr` = 0.01, `method.lora_rank` = 4" in card
    assert "- base model: builtin digits" in card and str(digits_cache) not in card and "site-packages" not in card
    assert "channels_frozen 0.9" in card and "inputs_frozen" not in card  # a Mamba-2 ratio, meaningless here
    assert "The model reads `<text>###` and answers the class index as text" in card
    assert 'PROMPT = "0 0 3 12 ' in card and ' ###"\n```' in card  # an example prompt: a test image's 61 pixels
    assert 'mlflow.transformers.load_model("models:/digits-adapter@champion")' in card
    # the files' modes: as any file the user writes (umask 022 here), not safetensors' 0600
    assert {oct(path.stat().st_mode & 0o777) for path in out.rglob("*") if path.is_file()} == {"0o644"}

    # merged/: a plain transformers model with the logits of base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(out / "merged").get_vocab() == digits_tokenizer().get_vocab()
    tokens = torch.tensor(digits_pixel_sequences("validation")[:4])
    adapted = sdt.load(fp32_base(spec), out).model.eval()
    with torch.no_grad():
        expected, got, plain = adapted(tokens).logits, merged(tokens).logits, fp32_base(spec)(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-4), (
        "the adapter must change the logits for this to test anything"
    )

    # the registry: alias champion -> a version listed under the parent run, an MLflow model logged from the
    # winner's run (the transformers flavor, the export beside it); the export is also the winner's artifacts
    client = MlflowClient(tracking_uri(spec))
    champion = client.get_model_version_by_alias("digits-adapter", CHAMPION_ALIAS)
    assert champion.run_id == sweep.parent and champion.tags["sdtune.trial_run_id"] == sweep.runs[WINNER]
    registered = record["mlflow"]["registered_model"]
    assert (registered["name"], str(registered["version"])) == ("digits-adapter", str(champion.version))
    experiment = client.get_run(sweep.parent).info.experiment_id
    [logged_model] = client.search_logged_models([experiment], filter_string="name = 'digits-adapter'")
    assert champion.source == registered["source"] == logged_model.artifact_location
    assert logged_model.source_run_id == sweep.runs[WINNER] and logged_model.status == "READY"
    for run in (sweep.parent, sweep.runs[WINNER]):
        assert [output.model_id for output in client.get_run(run).outputs.model_outputs] == [logged_model.model_id]
    model_files = {a.path for a in client.list_logged_model_artifacts(logged_model.model_id)}
    assert {"MLmodel", "model", "components", "sdtune_export"} <= model_files
    artifacts = {Path(a.path).name for a in client.list_artifacts(sweep.runs[WINNER], "export")}
    assert artifacts == CONTRACT | {"merged"}
    logged = Path(client.download_artifacts(sweep.runs[WINNER], "export/trial.json", str(sweep.root / "download")))
    assert json.loads(logged.read_text()) == record
    # the parent carries the winner's searched values
    parent = client.get_run(sweep.parent)
    assert (parent.data.params["training.lr"], parent.data.params["method.lora_rank"]) == ("0.01", "4")
    assert parent.data.tags["sdtune.best_trial_id"] == WINNER and parent.data.metrics["eval/accuracy"] == 0.8


def test_a_new_export_replaces_the_old_and_a_failed_one_leaves_it(sweep, monkeypatch):
    exports = sweep.root / "exports"
    spec = make_spec(sweep.root, dir=str(exports / "champion"), registered_model_name="digits-replaced")
    client = MlflowClient(tracking_uri(spec))
    out = run_export(spec, trials_of(sweep, spec), merge=True)
    (out / "stale.txt").write_text("from an older export")

    assert run_export(spec, trials_of(sweep, spec), merge=False) == out
    assert {path.name for path in out.iterdir()} == CONTRACT  # merged/ and the stale file are gone
    # the same trial exported again is the same registered model version
    assert int(client.get_model_version_by_alias("digits-replaced", CHAMPION_ALIAS).version) == 1

    before = snapshot(out)

    def broken_merge(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save_merged", broken_merge)
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(spec, trials_of(sweep, spec), merge=True)
    assert snapshot(out) == before
    assert [path.name for path in exports.iterdir()] == ["champion"]  # no staging directory left behind
    assert int(client.get_model_version_by_alias("digits-replaced", CHAMPION_ALIAS).version) == 1


def test_another_sweeps_export_is_never_replaced(sweep):
    exports = sweep.root / "exports-of-two-sweeps"
    spec = make_spec(sweep.root, dir=str(exports / "shared"), register_model=False)
    out = run_export(spec, trials_of(sweep, spec))
    before = snapshot(out)
    other = spec.model_copy(update={"name": "another-sweep"})  # a second sweep, told to export to the same place
    with pytest.raises(ExportRefused) as refused:
        run_export(other, trials_of(sweep, other))
    assert str(spec.sweep_dir.resolve()) in str(refused.value) and str(other.sweep_dir.resolve()) in str(refused.value)
    assert snapshot(out) == before
    assert [path.name for path in exports.iterdir()] == ["shared"]  # nothing staged beside it


def test_no_usable_trial_exports_nothing(sweep):
    spec = make_spec(sweep.root, dir=str(sweep.root / "never"))
    unusable = [trial for trial in trials_of(sweep, spec) if trial.trial_id in ("t_nan", "t_failed")]
    with pytest.raises(NoUsableTrialError):
        run_export(spec, unusable)
    assert not (sweep.root / "never").exists()


def test_without_a_trial_run_the_export_is_not_registered(sweep, caplog):
    spec = make_spec(
        sweep.root,
        tracking={"experiment": "untracked"},
        dir=str(sweep.root / "untracked"),
        registered_model_name="digits-unregistered",
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.results.export"):
        out = run_export(spec, trials_of(sweep, spec))

    assert {path.name for path in out.iterdir()} == CONTRACT
    assert json.loads((out / "trial.json").read_text())["mlflow"] == {
        "run_id": None,
        "parent_run_id": None,
        "registered_model": None,
    }
    assert any("not registered" in record.message for record in caplog.records)
    client = MlflowClient(tracking_uri(spec))
    with pytest.raises(MlflowException):
        client.get_registered_model("digits-unregistered")
    experiment = client.get_experiment_by_name("untracked")
    assert client.search_runs([experiment.experiment_id]) == []  # looking up created no parent or child run


def test_a_requirement_names_the_distribution_installed_here_at_its_release():
    from importlib.metadata import version

    from pipeline.results.champion import requirement

    assert requirement("mlflow") == f"mlflow=={version('mlflow')}"  # full MLflow installs mlflow-skinny too
    assert requirement("sklearn") == f"scikit-learn=={version('scikit-learn')}"  # imported under another name
    assert requirement("yaml") == f"PyYAML=={version('PyYAML')}"
    assert requirement("torch") == f"torch=={version('torch').split('+')[0]}"  # the CPU build's +cpu left out
