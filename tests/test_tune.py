"""The spec's search section as Ray Tune sees it (no Ray started): domains, scheduler, search algorithm, and the
grid searcher restored with the trials of an interrupted sweep."""

from __future__ import annotations

import json

import pytest
from ray import tune
from ray.tune.experiment import Experiment
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from pipeline.compat.tune import optuna_study
from pipeline.spec.job import parse_job
from pipeline.sweep.tune import (
    ResumableSearchGenerator,
    ResumableVariantGenerator,
    search_space,
    trials_at_once,
    tune_config,
)

BASE = {"name": "t", "model": {"builtin": "digits"}, "training": {"epochs": 4}}


def spec_with(search: dict, **sections):
    return parse_job({**BASE, **sections, "search": search})


def test_every_domain_kind_becomes_its_tune_domain():
    space = search_space(spec_with({"space": {
        "training.lr": {"loguniform": [1e-4, 1e-2]},
        "training.weight_decay": {"uniform": [0.0, 0.1]},
        "method.lora_rank": {"choice": [4, 8]},
        "training.seed": {"grid": [0, 1, 2]},
        "method.warmup_steps": {"randint": [10, 50]},
    }}))  # fmt: skip
    assert isinstance(space["training.lr"], Float) and isinstance(space["training.lr"].get_sampler(), LogUniform)
    assert (space["training.lr"].lower, space["training.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(space["training.weight_decay"], Float)
    assert isinstance(space["method.lora_rank"], Categorical) and space["method.lora_rank"].categories == [4, 8]
    assert space["training.seed"] == {"grid_search": [0, 1, 2]}
    assert isinstance(space["method.warmup_steps"], Integer) and space["method.warmup_steps"].upper == 50


def test_asha_counts_reports_and_optuna_samples():
    config = tune_config(spec_with(
        {"metric": "eval/loss", "mode": "min", "scheduler": "asha", "grace_period": 2, "algorithm": "optuna",
         "num_samples": 12, "space": {"training.lr": {"loguniform": [1e-4, 1e-2]}}},
        resources={"max_concurrent_trials": 3},
    ), at_once=3)  # fmt: skip
    assert isinstance(config.search_alg.searcher.searcher, OptunaSearch)  # behind its concurrency limit
    assert isinstance(config.scheduler, ASHAScheduler) and config.scheduler._max_t == 4
    assert config.search_alg.searcher.max_concurrent == 3
    assert (config.metric, config.mode, config.num_samples) == ("eval/loss", "min", 12)
    # with a report every N steps besides each epoch, the number of reports is not the number of epochs
    frequent = tune_config(spec_with({"scheduler": "asha"}, training={"epochs": 4, "eval_every_steps": 5}), 1)
    assert frequent.scheduler._max_t > 4
    assert isinstance(tune_config(spec_with({}), 1).scheduler, FIFOScheduler)


def test_one_trial_more_is_staged_only_where_the_running_trials_gpus_fill_the_cluster():
    def at_once(local: bool, cluster_gpus: float, trial_gpus: float, limit: int, stage=None) -> int:
        spec = spec_with({}, resources={"max_concurrent_trials": limit, "stage_next_trial": stage})
        return trials_at_once(spec, local, cluster_gpus, trial_gpus)

    assert at_once(True, 1, 1.0, 1) == 2  # one GPU, one trial at a time: the next one waits for it, staged
    assert at_once(True, 8, 1.0, 8) == 9
    assert at_once(True, 8, 2.0, 4) == 5  # trials of two workers
    assert at_once(True, 1, 0.25, 4) == 5  # four quarters fill the GPU
    assert at_once(True, 1, 1 / 16, 12) == 12  # a 13th sixteenth would run, not wait
    assert at_once(True, 8, 1.0, 1) == 1  # a second trial would run on a free GPU
    assert at_once(True, 1, 1.0, 8) == 8  # trials wait for the GPU already
    assert at_once(True, 0, 0.0, 2) == 2  # CPU trials
    assert at_once(False, 1, 1.0, 1) == 1  # a cluster sdtune connects to: its autoscaler might add a node
    assert at_once(False, 1, 1.0, 1, stage=True) == 2
    assert at_once(True, 1, 1.0, 1, stage=False) == 1
    config = tune_config(spec_with({}), at_once=2)
    assert config.search_alg.max_concurrent == 2 and config.max_concurrent_trials is None


def three_trial_searcher(tmp_path, searcher_class):
    """A grid of three trials, two at a time, with trials 0 and 1 handed out: saved as Tune saves it."""
    experiment = Experiment("grid", lambda config: None, config={"a": tune.grid_search([1, 2, 3])},
                            storage_path=str(tmp_path / "storage"))  # fmt: skip
    searcher = searcher_class(max_concurrent=2)
    searcher.add_configurations([experiment])
    made = [searcher.next_trial(), searcher.next_trial()]
    assert searcher.next_trial() is None  # two running: the limit
    searcher.save_to_dir(str(tmp_path), session_str="2026-12-02_06-27-33")
    return made[0].trial_id.removesuffix("00000")


def write_experiment_state(tmp_path, statuses: dict[str, str], configs=None, last_results=None) -> None:
    """Tune's experiment state file (the fields Tune writes that the searcher reads), saved after the searcher's."""
    configs, last_results = configs or {}, last_results or {}
    trial_data = [[json.dumps({"trial_id": trial_id, "status": status, "config": configs.get(trial_id, {})}),
                   json.dumps({"last_result": last_results.get(trial_id, {})})]
                  for trial_id, status in statuses.items()]  # fmt: skip
    (tmp_path / "experiment_state-2026-12-02_06-28-45.json").write_text(json.dumps({"trial_data": trial_data}))


@pytest.mark.parametrize("searcher_class", [BasicVariantGenerator, ResumableVariantGenerator])
def test_a_searcher_saved_before_its_trials_finished_is_restored_in_step_with_them(tmp_path, searcher_class):
    """The driver died after all three trials finished, but the stored searcher is the one saved while trials 0 and
    1 ran (Tune uploads the experiment directory while it rewrites its files). Tune's own searcher then counts 0
    and 1 as running for ever: with two at once allowed it never hands out a trial nor finishes, and the resumed
    sweep waits with nothing running (a sweep in object storage did). sdtune's is restored with no trial running and
    nothing left to hand out."""
    prefix = three_trial_searcher(tmp_path, searcher_class)
    write_experiment_state(tmp_path, {f"{prefix}{n:05d}": "TERMINATED" for n in range(3)})
    restored = searcher_class(max_concurrent=2)
    restored.restore_from_dir(str(tmp_path))
    assert restored.next_trial() is None
    assert restored.is_finished() == (searcher_class is ResumableVariantGenerator)


def test_a_restored_searcher_hands_out_only_the_trials_the_experiment_lacks(tmp_path):
    """Trial 0 finished, trial 1 was running (Tune runs it again by itself), trial 2 not yet made: the searcher
    counts one running trial and hands out trial 2, once; then the limit of two holds."""
    prefix = three_trial_searcher(tmp_path, ResumableVariantGenerator)
    write_experiment_state(tmp_path, {f"{prefix}00000": "TERMINATED", f"{prefix}00001": "RUNNING"})
    restored = ResumableVariantGenerator(max_concurrent=2)
    restored.restore_from_dir(str(tmp_path))
    assert restored.next_trial().trial_id == f"{prefix}00002"
    assert restored.next_trial() is None and not restored.is_finished()
    restored.on_trial_complete(f"{prefix}00001")
    restored.on_trial_complete(f"{prefix}00002")
    assert restored.next_trial() is None and restored.is_finished()


def optuna_searcher(searcher_class):
    """Optuna behind a limit of two trials at once, as sdtune gives it to Tune."""
    searcher = searcher_class(ConcurrencyLimiter(OptunaSearch(), max_concurrent=2))
    searcher.set_search_properties("eval/accuracy", "max", {"training.lr": tune.loguniform(1e-4, 1e-2)})
    return searcher


@pytest.mark.parametrize("searcher_class", [SearchGenerator, ResumableSearchGenerator])
def test_an_optuna_searcher_saved_before_its_trials_finished_is_restored_in_step_with_them(tmp_path, searcher_class):
    """Three Optuna samples, two at a time: saved with two running, which then finished before the driver died.
    Tune's restored limiter still counts both as running and never asks Optuna for the third; sdtune's does."""
    experiment = Experiment("optuna", lambda config: None, config={"training.lr": tune.loguniform(1e-4, 1e-2)},
                            num_samples=3, storage_path=str(tmp_path / "storage"))  # fmt: skip
    searcher = optuna_searcher(searcher_class)
    searcher.add_configurations([experiment])
    made = [searcher.next_trial().trial_id, searcher.next_trial().trial_id]
    searcher.save_to_dir(str(tmp_path), session_str="2026-12-02_06-27-33")
    write_experiment_state(tmp_path, dict.fromkeys(made, "TERMINATED"))
    restored = optuna_searcher(searcher_class)
    restored.restore_from_dir(str(tmp_path))
    third = restored.next_trial()
    assert (third is not None) == (searcher_class is ResumableSearchGenerator)
    if third is not None:
        assert restored.next_trial() is None  # three made: the samples asked for
        restored.on_trial_complete(third.trial_id, result={"eval/accuracy": 0.5, "training_iteration": 1})
        assert restored.is_finished()


@pytest.mark.parametrize("searcher_class", [SearchGenerator, ResumableSearchGenerator])
def test_a_trial_made_after_the_optuna_searcher_was_saved_reaches_optuna_on_resume(tmp_path, searcher_class):
    """Saved with trial 0 running; then trial 0 finished and trial 1 started, and the driver died. Tune runs trial 1
    again, and its first report made the resumed sweep fail: Tune's restored Optuna has no such trial (KeyError, a
    sweep in object storage). sdtune's takes trial 1's results with its configuration, and learns how trial 0
    ended."""
    experiment = Experiment("optuna", lambda config: None, config={"training.lr": tune.loguniform(1e-4, 1e-2)},
                            num_samples=3, storage_path=str(tmp_path / "storage"))  # fmt: skip
    searcher = optuna_searcher(searcher_class)
    searcher.add_configurations([experiment])
    first = searcher.next_trial()
    searcher.save_to_dir(str(tmp_path), session_str="2026-12-02_06-27-33")
    second_id = first.trial_id[:-5] + "00001"  # Tune's id for the next trial of the experiment
    configs = {first.trial_id: first.config, second_id: {"training.lr": 3e-3}}
    write_experiment_state(tmp_path, {first.trial_id: "TERMINATED", second_id: "RUNNING"}, configs,
                           {first.trial_id: {"eval/accuracy": 0.6, "training_iteration": 4}})  # fmt: skip
    restored = optuna_searcher(searcher_class)
    restored.restore_from_dir(str(tmp_path))
    report = {"eval/accuracy": 0.7, "training_iteration": 1}
    if searcher_class is SearchGenerator:
        with pytest.raises(KeyError):
            restored.on_trial_result(second_id, report)
        return
    restored.on_trial_result(second_id, report)
    third = restored.next_trial()
    assert third is not None and restored.next_trial() is None  # trial 1 and 2 running: the limit of two
    restored.on_trial_complete(second_id, result={**report, "training_iteration": 4})
    restored.on_trial_complete(third.trial_id, result={"eval/accuracy": 0.5, "training_iteration": 4})
    assert restored.is_finished()
    study = optuna_study(restored.searcher.searcher)
    told = sorted((trial.params["training.lr"], trial.value) for trial in study.get_trials() if trial.value is not None)
    assert told == sorted([(first.config["training.lr"], 0.6), (3e-3, 0.7), (third.config["training.lr"], 0.5)])
