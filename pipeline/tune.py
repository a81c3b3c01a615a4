"""The sweep: Ray Tune over the spec's search space; each trial builds and fits a Ray Train worker group.

Ray Train V2 style: Tune runs a function trainable that builds the trial's ``TorchTrainer``; the Train→Tune
``TuneReportCallback`` forwards each report (and its ``checkpoint_path``) to Tune, and MLflow follows from the
Tune driver (:class:`pipeline.sweep_callbacks.MLflowSweepCallback`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipeline.config import Domain, JobSpec
from pipeline.results import TUNE_DIR, TUNE_ERROR, TrialOutcome, outcomes
from pipeline.sweep_callbacks import MLflowSweepCallback, TrialLedger
from pipeline.tracking import SweepTracker
from pipeline.train import build_trainer


def to_tune_domain(domain: Domain) -> Any:
    low_high = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    if domain.kind == "grid":
        return tune.grid_search(domain.grid)
    if domain.kind == "choice":
        return tune.choice(domain.choice)
    return low_high[domain.kind](*getattr(domain, domain.kind))


def search_space(spec: JobSpec) -> dict[str, Any]:
    """Tune's param space: the spec's dotted keys (``training.lr``...) with their Tune domains."""
    return {key: to_tune_domain(domain) for key, domain in spec.search.space.items()}


def trial_driver(config: dict[str, Any], spec: JobSpec) -> None:
    """One trial: the sweep's spec with this trial's sampled values, run as a Ray Train worker group."""
    trial_spec = spec.with_overrides(config)
    trial_id = tune.get_context().get_trial_id()
    build_trainer(trial_spec, name=f"trial-{trial_id}", callbacks=[TuneReportCallback()]).fit()


def make_trainable(spec: JobSpec):
    return tune.with_resources(tune.with_parameters(trial_driver, spec=spec), {"cpu": spec.resources.trial_cpus})


def tune_config(spec: JobSpec) -> tune.TuneConfig:
    """The spec's metric, sampling, scheduler and concurrency as Tune's config."""
    search = spec.search
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",  # reports: one per epoch, plus one per eval_every_steps
            # A trial's last report ends it anyway; the bound only matters in that ASHA stops trials reaching it.
            max_t=spec.training.epochs if spec.training.eval_every_steps is None else 10**9,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.TuneConfig(
        metric=search.metric,
        mode=search.mode,
        num_samples=search.num_samples,
        search_alg=search_alg,
        scheduler=scheduler,
        max_concurrent_trials=spec.resources.max_concurrent_trials,
    )


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep run ended with, handed to export and report in memory."""

    trials: list[TrialOutcome]

    @property
    def num_errors(self) -> int:
        return sum(trial.status == TUNE_ERROR for trial in self.trials)


def make_experiment(spec: JobSpec, tracker: SweepTracker) -> tune.Tuner:
    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    return tune.Tuner(
        make_trainable(spec),
        param_space=search_space(spec),
        tune_config=tune_config(spec),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(tune_dir.parent),
            callbacks=[MLflowSweepCallback(tracker), TrialLedger(spec.sweep_dir.resolve())],
        ),
    )


def run_sweep(spec: JobSpec, tracker: SweepTracker) -> SweepOutcome:
    """Run (or, when its Tune directory exists, resume) the sweep of ``spec``."""
    # Tune saves its experiment state at most every 10 s by default: a driver dying in that window would run the
    # trials that finished in it again on resume (each then only re-reports its final checkpoint, see
    # pipeline.train). The state is small; save it at every step.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    if tune.Tuner.can_restore(str(tune_dir)):
        # ray.tune.Tuner, not sdt.Tuner: the experiment of the whole sweep.
        experiment = tune.Tuner.restore(str(tune_dir), trainable=make_trainable(spec), resume_errored=True)
    else:
        experiment = make_experiment(spec, tracker)
    try:
        experiment.fit()
    except KeyboardInterrupt:
        tracker.finish_sweep("KILLED")
        raise
    tracker.finish_sweep("FINISHED")
    return SweepOutcome(outcomes(spec, TrialLedger.take(spec.sweep_dir.resolve())))
