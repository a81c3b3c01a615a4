"""Ray Tune's and Optuna's internals that the sweep touches: the state of Tune's searchers, which a resumed sweep
restores in step with its trials (Tune offers no public way to tell a restored searcher which trials ran), and the
experiment-state file those trials are read from."""

from __future__ import annotations

import json
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.utils import flatten_dict

from sdt.compat import CompatError, require

FINISHED = ("TERMINATED", "ERROR")  # Ray Tune's statuses of a trial that will not run again by itself
EXPERIMENT_STATE = "experiment_state-*.json"  # TuneController.CKPT_FILE_TMPL
VARIANTS = "ray.tune.search.BasicVariantGenerator"
OPTUNA = "ray.tune.search.optuna.OptunaSearch"
TRIAL = "ray.tune.experiment.Trial"


@dataclass(frozen=True)
class StoredTrial:
    """A trial as Tune's experiment state holds it: its status, its configuration and its last result, flattened
    as Tune hands them to a searcher."""

    status: str
    config: dict[str, Any]
    last_result: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def stored_trials(experiment_dir: Path) -> dict[str, StoredTrial]:
    """{trial id: trial} in the experiment state Tune restores from: the newest ``experiment_state-*.json`` of its
    experiment directory (by name, as Tune picks it; ``{}`` without one). Tune's public reader of it
    (``ExperimentAnalysis``) also loads every trial's results; a searcher needs these three fields of each."""
    newest = max(experiment_dir.glob(EXPERIMENT_STATE), default=None)
    if newest is None:
        return {}
    trials = {}
    try:
        for state, run_metadata in json.loads(newest.read_text())["trial_data"]:
            trial, metadata = json.loads(state), json.loads(run_metadata)
            trials[trial["trial_id"]] = StoredTrial(trial["status"], flatten_dict(trial.get("config", {})),
                                                    flatten_dict(metadata.get("last_result", {})))  # fmt: skip
    except (KeyError, TypeError) as error:
        raise CompatError(
            "ray", f"Tune's experiment state ({newest.name})", f"has another layout ({error!r})"
        ) from None
    return trials


def set_live_trials(generator: BasicVariantGenerator, trial_ids: Iterable[str]) -> None:
    """The trials ``generator`` counts as running (against its ``max_concurrent``)."""
    require(generator, "_live_trials", "ray", VARIANTS)
    generator._live_trials = set(trial_ids)


def skip_made_trials(generator: BasicVariantGenerator, made: Container[str]) -> None:
    """Move ``generator``'s trial iterators past the trials whose ids are in ``made``, so that it does not hand
    them out again (an iterator names its next trial ``<uuid_prefix><counter:05d>``, as Tune makes trial ids)."""
    for iterator in require(generator, "_iterators", "ray", VARIANTS):
        for name in ("uuid_prefix", "counter"):
            require(iterator, name, "ray", "ray.tune.search.basic_variant._TrialIterator")
        while f"{iterator.uuid_prefix}{iterator.counter:05d}" in made:
            try:
                next(iterator)
            except StopIteration:  # all made: the searcher finds that out at its next trial
                break


def count_made_trials(generator: SearchGenerator, made: int) -> None:
    """``generator`` counts at least ``made`` trials made (against its ``num_samples``)."""
    counted = require(generator, "_counter", "ray", "ray.tune.search.SearchGenerator")
    generator._counter = max(counted, made)


def set_limiter_live_trials(limiter: ConcurrencyLimiter, trial_ids: Iterable[str]) -> None:
    """The trials ``limiter`` counts as running (against its ``max_concurrent``)."""
    require(limiter, "live_trials", "ray", "ray.tune.search.ConcurrencyLimiter")
    require(limiter, "num_unfinished_live_trials", "ray", "ray.tune.search.ConcurrencyLimiter")
    limiter.live_trials = set(trial_ids)
    limiter.num_unfinished_live_trials = len(limiter.live_trials)


def optuna_study(searcher: Any) -> Any:
    """The ``optuna.Study`` behind Tune's ``OptunaSearch``."""
    return require(searcher, "_ot_study", "ray", OPTUNA)


def optuna_has_trial(searcher: Any, trial_id: str) -> bool:
    """Whether Tune's ``OptunaSearch`` asked Optuna for the trial ``trial_id``."""
    return trial_id in require(searcher, "_ot_trials", "ray", OPTUNA)


def optuna_completed(searcher: Any, trial_id: str) -> bool:
    """Whether Tune's ``OptunaSearch`` told Optuna how the trial ``trial_id`` ended."""
    return trial_id in require(searcher, "_completed_trials", "ray", OPTUNA)


def enqueue_in_optuna(searcher: Any, config: dict[str, Any]) -> None:
    """Optuna's next trial has the searched values of ``config`` (a flattened Tune configuration)."""
    space = require(searcher, "_space", "ray", OPTUNA)
    optuna_study(searcher).enqueue_trial({name: config[name] for name in space})


def trial_error(trial: Trial) -> str | None:
    """What a failed trial raised, from its local error file (``Trial.error_file``, a developer API): the copy in the
    trial's storage (``Trial.get_error``) is synced only later, after the callbacks that report the failure."""
    require(Trial, "error_file", "ray", TRIAL)
    return Path(trial.error_file).read_text() if trial.error_file else None


def trial_checkpoint_path(trial: Trial) -> str | None:
    """Where the latest checkpoint Tune recorded for ``trial`` is (``Trial.checkpoint``, a developer API), or None."""
    require(Trial, "checkpoint", "ray", TRIAL)
    checkpoint = trial.checkpoint
    return None if checkpoint is None else checkpoint.path
