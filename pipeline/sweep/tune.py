"""The sweep: Ray Tune over the spec's search space; each trial builds and fits a Ray Train worker group.

Ray Train V2 style: Tune runs a function trainable that builds the trial's ``TorchTrainer``; the Train→Tune
``TuneReportCallback`` forwards each report (and its ``checkpoint_path``) to Tune, and MLflow follows from the
Tune driver (:class:`pipeline.sweep.callbacks.MLflowSweepCallback`).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

from pipeline.compat import tune as tune_compat
from pipeline.results.costs import record_driver_run, reserved_gpus
from pipeline.results.outcomes import TUNE_ERROR, TrialOutcome, outcomes
from pipeline.results.tracking import SweepTracker
from pipeline.spec.job import Domain, JobSpec, TrialSpecs
from pipeline.storage.layout import REPORTS_KEY, TUNE_DIR
from pipeline.sweep.callbacks import MLflowSweepCallback, ProgressCallback, TrialCostCallback, TrialLedger, ended_ids
from pipeline.trial.claims import end_coordinator
from pipeline.trial.driver import trial_driver, trial_gpus


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


def make_trainable(spec: JobSpec, waits_for_gpus: bool):
    """Tune's trainable: :func:`pipeline.trial.driver.trial_driver` with the spec; ``waits_for_gpus``: Tune runs more
    trials at once than the cluster's GPUs hold (a staged trial, or more trials than fit), so a trial may wait for
    GPUs."""
    driver = tune.with_parameters(trial_driver, spec=spec, waits_for_gpus=waits_for_gpus)
    return tune.with_resources(driver, {"cpu": spec.resources.trial_cpus})


def trials_at_once(spec: JobSpec, local_cluster: bool, cluster_gpus: float, gpus_per_trial: float) -> int:
    """How many trials Tune runs at once: ``resources.max_concurrent_trials``, and one more (a staged trial) when
    those trials' GPUs fill the cluster and ``resources.stage_next_trial`` (None: ``local_cluster``) allows it. The
    staged trial's Tune function and Train controller start while the others train; its worker group waits in
    Ray's placement-group queue and is placed as soon as a running trial frees its GPUs. Without it, the next
    trial's Ray processes would start only then, with the GPUs idle (how long, staged and not: docs/benchmarks.md,
    "Trial start-up in a 4-trial sequential sweep"). Where one trial more would find
    GPUs free (12 trials of 1/16 GPU on one GPU, or more GPUs than trials) it would run rather than wait, and where
    trials already wait for GPUs it adds nothing: neither stages. A trial that may wait for GPUs waits without Ray
    Train's worker-group start timeout (:data:`pipeline.trial.driver.WAIT_FOR_GPUS_S`)."""
    limit = spec.resources.max_concurrent_trials
    stage = spec.resources.stage_next_trial
    if not (local_cluster if stage is None else stage) or gpus_per_trial <= 0:
        return limit
    fill = gpus_fit(limit, gpus_per_trial, cluster_gpus) and not gpus_fit(limit + 1, gpus_per_trial, cluster_gpus)
    return limit + 1 if fill else limit


def gpus_fit(trials: int, gpus_per_trial: float, cluster_gpus: float) -> bool:
    """Whether ``trials`` trials at once hold no more GPUs than the cluster has (fractions summed as Ray does)."""
    return trials * gpus_per_trial <= cluster_gpus + 1e-9


def tune_config(spec: JobSpec, at_once: int) -> tune.TuneConfig:
    """The spec's metric, sampling and scheduler as Tune's config, with ``at_once`` trials at a time
    (:func:`trials_at_once`)."""
    search = spec.search
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr=REPORTS_KEY,  # one per epoch, plus one per eval_every_steps
            # A trial's last report ends it anyway; the bound only matters in that ASHA stops trials reaching it.
            max_t=spec.training.epochs if spec.training.eval_every_steps is None else 10**9,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ResumableSearchGenerator(ConcurrencyLimiter(OptunaSearch(), max_concurrent=at_once))
    else:
        search_alg = ResumableVariantGenerator(max_concurrent=at_once)
    return tune.TuneConfig(
        metric=search.metric,
        mode=search.mode,
        num_samples=search.num_samples,
        search_alg=search_alg,
        scheduler=scheduler,
        max_concurrent_trials=None,  # each search algorithm above limits itself
    )


class ResumableVariantGenerator(BasicVariantGenerator):
    """Ray Tune's grid and random searcher (its default), restored in step with the trials it made.

    Tune saves the trials and the searcher in two files of the experiment directory and uploads the directory while
    it rewrites them, so after the driver dies the stored searcher can be older than the stored trials. Restored as
    it is, it counts trials that have finished as running: with ``max_concurrent_trials`` of them counted it never
    hands out another trial, and the resumed sweep waits forever with nothing running (a sweep in object storage
    whose driver was killed did). It could also hand out again a trial the experiment already has. Restored here, it
    counts as running only the experiment's unfinished trials and skips the trials the experiment holds."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = tune_compat.stored_trials(Path(dirpath))
        tune_compat.set_live_trials(self, {trial_id for trial_id, trial in trials.items() if not trial.finished})
        tune_compat.skip_made_trials(self, trials)


class ResumableSearchGenerator(SearchGenerator):
    """The same for Optuna behind Tune's ``ConcurrencyLimiter``, whose stored trials can be as old. Restored as it
    is, its limiter counts finished trials as running (and may never ask Optuna for the rest), Optuna never hears
    how they ended, and a trial made after the searcher was saved, which Tune runs again, makes the sweep fail at
    its first report (Optuna has no such trial: a sweep in object storage killed a second after its third trial
    started did). Restored here, every trial of the experiment reaches Optuna with its configuration, the finished
    ones with their last result; the limiter counts the unfinished ones, and no more trials are made than the
    experiment lacks."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = tune_compat.stored_trials(Path(dirpath))
        tune_compat.count_made_trials(self, len(trials))
        limiter = self.searcher
        optuna = limiter.searcher
        for trial_id, trial in trials.items():
            if not tune_compat.optuna_has_trial(optuna, trial_id):  # made after the stored searcher was saved
                tune_compat.enqueue_in_optuna(optuna, trial.config)
                optuna.suggest(trial_id)  # Optuna's next trial is the one enqueued: the trial's own parameters
            if trial.finished and not tune_compat.optuna_completed(optuna, trial_id):
                optuna.on_trial_complete(trial_id, result=trial.last_result, error=trial.status == "ERROR")
        tune_compat.set_limiter_live_trials(
            limiter, {trial_id for trial_id, trial in trials.items() if not trial.finished}
        )


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep run ended with, handed to export and report in memory. ``interrupted``: stopped by a signal
    before every trial ended (resume it); ``trained``: whether this run trained anything (a sweep resumed after
    it had finished trains nothing)."""

    trials: list[TrialOutcome]
    interrupted: bool
    trained: bool
    cut_short: frozenset[str]  # trials this run stopped before they ended

    @property
    def num_ended(self) -> int:
        """Trials that ran to their end (trained, stopped early by the scheduler, or failed)."""
        return len(ended_ids(self.trials) - self.cut_short)

    @property
    def num_errors(self) -> int:
        return sum(trial.status == TUNE_ERROR for trial in self.trials)


class StopSignals:
    """SIGINT (Ctrl+C) and SIGTERM stop the sweep the way Ray Tune's own SIGUSR1 does: no new trial starts, the
    experiment state is saved, the running trials are stopped (and ``sdtune resume`` continues them). The first
    signal is remembered, so the caller can tell an interrupted sweep from a finished one; a second one raises
    KeyboardInterrupt at once. Tune's own SIGINT handler is switched off: it forgets that it was interrupted."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = sig
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends its loop, saves its state and stops the trials


def make_experiment(spec: JobSpec, tracker: SweepTracker, trainable, at_once: int) -> tune.Tuner:
    tune_dir, specs = spec.sweep_dir.resolve() / TUNE_DIR, TrialSpecs(spec)
    return tune.Tuner(
        trainable,
        param_space=search_space(spec),
        tune_config=tune_config(spec, at_once),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(tune_dir.parent),
            # one TrialSpecs for all of them (pickled with them into Tune's state, so a restored sweep shares it too)
            callbacks=[
                MLflowSweepCallback(specs, tracker),
                TrialCostCallback(spec, tracker, trial_gpus(spec)),
                TrialLedger(specs),
                ProgressCallback(specs, staged=at_once > spec.resources.max_concurrent_trials),
            ],
            verbose=0,  # no trial table: ProgressCallback shows the trials (pipeline.sweep.console)
        ),
    )


def run_sweep(spec: JobSpec, tracker: SweepTracker, local_cluster: bool) -> SweepOutcome:
    """Run (or, when its Tune directory exists, resume) the sweep of ``spec`` on the connected Ray instance
    (``local_cluster``: one this command started). The MLflow parent run is left RUNNING: what it ends as depends
    on what the caller does next (export, or a failure)."""
    # Tune saves its experiment state at most every 10 s by default: a driver dying in that window would run the
    # trials that finished in it again on resume (each then only re-reports its final checkpoint, see
    # pipeline.trial.worker). On a local disk the state is small: save it at every step. In object storage each save
    # uploads the experiment directory again (every trial's result files too), which at every step is an upload
    # running back to back (about 80 requests a second with two trials running); there Tune's default stays.
    if isinstance(spec.sweep_dir, Path):
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    cluster_gpus, gpus = ray.cluster_resources().get("GPU", 0.0), trial_gpus(spec)
    at_once = trials_at_once(spec, local_cluster, cluster_gpus, gpus)  # a resumed sweep keeps the searcher it had
    trainable = make_trainable(spec, waits_for_gpus=not gpus_fit(at_once, gpus, cluster_gpus))
    if tune.Tuner.can_restore(str(tune_dir)):
        # ray.tune.Tuner, not sdt.Tuner: the experiment of the whole sweep.
        experiment = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        experiment = make_experiment(spec, tracker, trainable, at_once)
    capacity = reserved_gpus(cluster_gpus, local_cluster, spec.resources.max_concurrent_trials, gpus)
    started = time.time()
    try:
        with StopSignals() as signals:
            experiment.fit()
    finally:
        end_coordinator(spec.sweep_dir)  # the warmup claims of its trials (pipeline.trial.claims): none is running now
        record_driver_run(spec.sweep_dir, started, time.time(), capacity)  # for the report's GPU-time breakdown
    ledger = TrialLedger.take(spec.sweep_dir.resolve())
    interrupted = signals.received is not None or ledger.unfinished
    return SweepOutcome(outcomes(ledger.specs, ledger.trials), bool(interrupted), ledger.started, ledger.cut_short)
