"""The spec's search section as Ray Tune sees it (no Ray started): domains, scheduler, search algorithm."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from pipeline.config import parse_job
from pipeline.tune import search_space, tune_config

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
    ))  # fmt: skip
    assert isinstance(config.search_alg, OptunaSearch)
    assert isinstance(config.scheduler, ASHAScheduler) and config.scheduler._max_t == 4
    assert (config.metric, config.mode, config.num_samples, config.max_concurrent_trials) == ("eval/loss", "min", 12, 3)
    # with a report every N steps besides each epoch, the number of reports is not the number of epochs
    frequent = tune_config(spec_with({"scheduler": "asha"}, training={"epochs": 4, "eval_every_steps": 5}))
    assert frequent.scheduler._max_t > 4
    assert isinstance(tune_config(spec_with({})).scheduler, FIFOScheduler)
