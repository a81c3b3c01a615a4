"""The sweep: Ray Tune over the spec's search space; each trial builds and fits a Ray Train worker group.

Ray Train V2 style: Tune runs a function trainable that builds the trial's ``TorchTrainer``; the Train→Tune
``TuneReportCallback`` forwards each report (and its ``checkpoint_path``) to Tune, and MLflow follows from the
Tune driver (:class:`pipeline.tracking.MLflowSweepCallback`).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipeline.config import Domain, JobSpec, parse_job
from pipeline.results import FINISHED, TUNE_DIR
from pipeline.tracking import MLflowSweepCallback, SweepTracker
from pipeline.train import build_trainer

# Fault injection for the resume test: SIGKILL the sweep driver once this many trials have finished.
KILL_AFTER_TRIALS_ENV = "SDTUNE_TEST_KILL_DRIVER_AFTER_TRIALS"


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


def trial_driver(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One trial: the job with this trial's sampled values, run as a Ray Train worker group."""
    spec = parse_job(job, source="sweep").with_overrides(config)
    trial_id = tune.get_context().get_trial_id()
    build_trainer(spec, name=f"trial-{trial_id}", callbacks=[TuneReportCallback()]).fit()


def make_trainable(spec: JobSpec):
    job = spec.model_dump(mode="json")
    return tune.with_resources(tune.with_parameters(trial_driver, job=job), {"cpu": spec.resources.trial_cpus})


class KillDriverAfterTrials(Callback):
    """Kills this driver process, as a crash would, once Tune's experiment state *on disk* (it writes it in the
    background) records ``KILL_AFTER_TRIALS_ENV`` finished trials. The variable is read at every step, so a
    restored sweep without it runs on."""

    def __init__(self, tune_dir: Path):
        self.tune_dir = tune_dir

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        limit = int(os.environ.get(KILL_AFTER_TRIALS_ENV, 0))
        if limit and self.finished_on_disk() >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    def finished_on_disk(self) -> int:
        try:
            state = json.loads(max(self.tune_dir.glob("experiment_state-*.json")).read_text())
        except (ValueError, OSError):  # none yet, or caught mid-copy
            return 0
        return sum(json.loads(trial)["status"] == FINISHED for trial, _ in state["trial_data"])


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


def make_tuner(spec: JobSpec, tracker: SweepTracker) -> tune.Tuner:
    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    callbacks = [MLflowSweepCallback(tracker)]
    if KILL_AFTER_TRIALS_ENV in os.environ:
        callbacks.append(KillDriverAfterTrials(tune_dir))
    return tune.Tuner(
        make_trainable(spec),
        param_space=search_space(spec),
        tune_config=tune_config(spec),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(tune_dir.parent), callbacks=callbacks),
    )


def run_sweep(spec: JobSpec) -> tune.ResultGrid:
    """Run (or, when its Tune directory exists, resume) the sweep of ``spec``."""
    # Tune saves its experiment state at most every 10 s by default: a driver dying in that window would run the
    # trials that finished in it again on resume (each then only re-reports its final checkpoint, see
    # pipeline.train). The state is small; save it at every step.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    tracker = SweepTracker(spec)
    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    if tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(str(tune_dir), trainable=make_trainable(spec), resume_errored=True)
    else:
        tuner = make_tuner(spec, tracker)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        tracker.finish_sweep("KILLED")
        raise
    tracker.finish_sweep("FINISHED")
    return results

