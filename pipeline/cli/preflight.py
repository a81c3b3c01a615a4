"""Everything about a job that can be checked against the world before Ray starts: files and model paths exist,
the base model can be built and every searched method selects something in it, the batch fits the data, the
metric is one the task reports, the tracking server answers, and a trial fits the cluster.

:mod:`pipeline.spec.job` checks the spec as a document; this module checks it against the machine, in seconds,
writing nothing. Every problem is a :class:`~pipeline.spec.job.JobSpecError` naming the field, so a sweep never
starts only to fail in its trials over something knowable up front.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import sdt
from pipeline.results.outcomes import exception_line
from pipeline.spec.job import JobSpec, JobSpecError, load_job, method_field
from pipeline.storage.paths import ObjectPath, check_reachable, storage_path
from pipeline.tasks.registry import get_task

HUB_TIMEOUT_S = 5
TRACKING_TIMEOUT_S = 3


def load_checked(
    job: str | Path, overrides: Sequence[str] = (), address: str | None = None, in_sweep: bool = True
) -> JobSpec:
    """The validation entry point: the spec of ``job`` with ``overrides``, its relative paths made absolute (Ray
    workers run elsewhere), checked against this machine, and a trial's resources (``in_sweep``: with its Tune
    driver) against those of the Ray cluster at ``address`` (None: the one Ray would start here). Raises
    :class:`JobSpecError`."""
    spec = load_job(job, overrides).with_absolute_paths()
    check(spec)
    if address is None:
        check_resources(spec, *local_resources(), in_sweep=in_sweep)
    else:
        cpus, gpus, largest_node = cluster_resources(address)
        check_resources(spec, cpus, gpus, in_sweep=in_sweep, largest_node=largest_node)
    return spec


def check(spec: JobSpec) -> None:
    """All of the checks below that need no Ray cluster; the first failure raises."""
    check_paths(spec)
    check_metric(spec)
    check_method_fits(spec, skeleton(spec))
    check_data_size(spec)
    check_tracking(spec)


def check_paths(spec: JobSpec) -> None:
    output = storage_path(spec.output_dir)
    try:
        if isinstance(output, ObjectPath):
            check_reachable(output)
        output_is_file = output.exists() and not output.is_dir()
        sweep_dir_is_file = spec.sweep_dir.exists() and not spec.sweep_dir.is_dir()
    except (OSError, ValueError) as error:  # object storage: no answer, no bucket, refused credentials, a bad URI
        raise JobSpecError("output_dir", f"cannot use {output}: {' '.join(str(error).split())[:300]}") from None
    if output_is_file:
        raise JobSpecError("output_dir", f"{output} is a file, not a directory")
    if sweep_dir_is_file:
        raise JobSpecError("name", f"{spec.sweep_dir} is a file, not a sweep directory")
    for split, path in (spec.data.data_files or {}).items():
        if not Path(path).is_file():
            raise JobSpecError(f"data.data_files.{split}", f"no such file: {path}")
    if spec.model.name_or_path and _looks_local(spec.model.name_or_path) and not Path(spec.model.name_or_path).is_dir():
        raise JobSpecError("model.name_or_path", f"no such directory: {spec.model.name_or_path}")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative to here or home, or deeper than org/name."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).exists()


def check_metric(spec: JobSpec) -> None:
    """``search.metric`` is a validation metric the task reports (or the training loss)."""
    task = get_task(spec.data.task)
    kind = task.kind_of(spec.data)
    allowed = [f"eval/{name}" for name in task.metric_names(spec.data)] + ["train/loss"]
    metric = spec.search.metric
    if metric.startswith("test/"):
        raise JobSpecError("search.metric", f"{metric}: the test split never picks trials (it is scored once, at the "
                                            f"end); use {metric.replace('test/', 'eval/', 1)}")  # fmt: skip
    if metric not in allowed:
        raise JobSpecError(
            "search.metric", f"{metric!r} is not reported by a {kind} task; choose one of {', '.join(allowed)}"
        )


def skeleton(spec: JobSpec) -> PreTrainedModel:
    """The base's architecture on the meta device: shapes, no weights, nothing downloaded but a hub config."""
    from pipeline.tasks.digits import digits_base_config
    from pipeline.trial.models import fresh_config

    model = spec.model
    trust = {"trust_remote_code": True} if model.trust_remote_code else {}
    try:
        if model.builtin is not None:
            config = digits_base_config()
        elif model.architecture is not None:
            config, _ = fresh_config(model, trust)  # the vocabulary and special ids a trial's model gets
        else:
            config = hub_config(model.name_or_path, trust)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **trust)
    except JobSpecError:
        raise
    except Exception as error:  # a config transformers cannot build: hidden_size -4, an unknown key's type, ...
        where = "model.config" if model.architecture is not None else "model"
        raise JobSpecError(where, f"cannot build the model: {type(error).__name__}: {error}") from None


def hub_config(name: str, trust: dict) -> object:
    """The config of a local directory, of a model in the Hugging Face cache, or (asked once, briefly) of one on
    the hub; a hub that cannot be reached is an error here rather than six retries and a failed sweep later."""
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **trust)
    except OSError:
        pass
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except Exception as error:
        raise JobSpecError(
            "model.name_or_path",
            f"{name!r} is not a local directory or in the Hugging Face cache, and the hub did not answer "
            f"({type(error).__name__}); download it where there is a network, or give a local path",
        ) from None
    return AutoConfig.from_pretrained(name, **trust)


def check_method_fits(spec: JobSpec, model: PreTrainedModel) -> None:
    """The base is a model sdt can tune, and every method the sweep can run selects at least one channel, state
    (and Mamba-2 input) per layer of it: the error a trial would raise, raised now, naming the field (or the
    searched key and its value)."""
    try:
        sdt.check_counts(model, spec.method.to_sdt_config(seed=0))
    except sdt.UnsupportedModelError as error:
        raise JobSpecError(*unsupported_model(spec, error)) from None
    except sdt.SDTConfigError as error:
        raise JobSpecError(f"method.{method_field(error.field)}", error.reason) from None
    for key, value, trial in searched_methods(spec):
        try:
            sdt.check_counts(model, trial.method.to_sdt_config(seed=0))
        except sdt.SDTConfigError as error:
            raise JobSpecError(f"search.space.{key}", f"value {value!r} fails: {error}") from None


def unsupported_model(spec: JobSpec, error: sdt.UnsupportedModelError) -> tuple[str, str]:
    """(field, reason) of a base sdt cannot tune: the key of ``model.config`` the job wrote, the config it left at
    transformers' defaults, or the checkpoint whose config it is."""
    model = spec.model
    if model.architecture is not None:
        written = error.field in model.config
        return ("model.config" + (f".{error.field}" if written else "")), (error.reason if written else str(error))
    return ("model.name_or_path" if model.name_or_path else "model"), str(error)


def searched_methods(spec: JobSpec) -> list[tuple[str, Any, JobSpec]]:
    """(key, value, the spec with it) for every value a searched ``method`` key can take (the end points of a
    range): what the sweep's trials train."""
    return [
        (key, value, spec.with_overrides({key: value}))
        for key, domain in spec.search.space.items()
        if key == "method" or key.startswith("method.")
        for value in domain.candidates()
    ]


def arm_plans(spec: JobSpec) -> dict[str, sdt.Plan]:
    """What each method the sweep can run trains in the base (:func:`sdt.plan`), by the sweep's arm labels."""
    methods = {_arm_label(key, value, trial): trial for key, value, trial in searched_methods(spec)}
    model = skeleton(spec)
    return {
        label: sdt.plan(model, trial.method.to_sdt_config(seed=0))
        for label, trial in (methods or {spec.method.name: spec}).items()
    }


def training_plans(spec: JobSpec) -> list[str]:
    """What each method the sweep can run trains in the base, per kind of layer, and how many parameters that is
    (:func:`sdt.plan`), labelled as the sweep's arms are: lines to print."""
    return [f"{label}: {line}" for label, plan in arm_plans(spec).items() for line in plan.lines()]


def _arm_label(key: str, value: Any, trial: JobSpec) -> str:
    from pipeline.results.arms import method_label, value_label

    if key == "method":
        return method_label(trial.method.name, value)
    if key == "method.name":
        return value
    return f"{trial.method.name} {key.removeprefix('method.')}={value_label(value)}"


def train_examples(spec: JobSpec) -> int | None:
    """How many training examples the task will have, where its registry entry knows without downloading (the
    built-in tasks, local files); None otherwise (a Hugging Face dataset)."""
    data = spec.data
    count = get_task(data.task).train_rows
    rows = count(data) if count else None
    return None if rows is None else min(rows, data.max_train_samples or rows)


def check_data_size(spec: JobSpec) -> None:
    rows = train_examples(spec)
    needed = spec.training.batch_size * spec.resources.num_workers
    if rows is not None and rows < needed:
        raise JobSpecError(
            "training.batch_size",
            f"{spec.training.batch_size} x {spec.resources.num_workers} workers needs {needed} training examples "
            f"for one step; the data has {rows}",
        )


def check_tracking(spec: JobSpec) -> None:
    """An MLflow tracking server named by ``tracking.uri`` (or $MLFLOW_TRACKING_URI) answers its health check."""
    from pipeline.results.tracking import tracking_uri

    uri = tracking_uri(spec)
    if not uri.startswith(("http://", "https://")):
        return
    field = "tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TRACKING_TIMEOUT_S) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise JobSpecError(
            field, f"the MLflow server at {uri} did not answer within {TRACKING_TIMEOUT_S} s ({reason})"
        ) from None


def check_resources(
    spec: JobSpec, cpus: float, gpus: float, in_sweep: bool = True, largest_node: tuple[float, float] | None = None
) -> None:
    """One trial (its workers, and ``in_sweep`` its Tune driver) fits in ``cpus`` / ``gpus``, and each worker in
    the ``largest_node``'s (CPUs, GPUs) (None: one node has them all): otherwise Ray would wait for resources
    forever."""
    resources = spec.resources
    driver = resources.trial_cpus if in_sweep else 0.0
    needs_cpus = driver + resources.num_workers * resources.cpus_per_worker
    node_cpus, node_gpus = largest_node or (cpus, gpus)
    if needs_cpus > cpus:
        raise JobSpecError(
            "resources.cpus_per_worker",
            f"a trial needs {needs_cpus:g} CPUs ({resources.num_workers} workers x {resources.cpus_per_worker:g}"
            + (f" + {driver:g} for its driver" if driver else "")
            + f"); the cluster has {cpus:g}",
        )
    if resources.cpus_per_worker > node_cpus:
        raise JobSpecError(
            "resources.cpus_per_worker",
            f"a worker needs {resources.cpus_per_worker:g} CPUs on one node; the cluster's largest node has "
            f"{node_cpus:g}",
        )
    if resources.use_gpu:
        needs_gpus = resources.num_workers * resources.gpus_per_worker
        if needs_gpus > gpus:
            raise JobSpecError(
                "resources.use_gpu",
                f"a trial needs {needs_gpus:g} GPUs ({resources.num_workers} workers x {resources.gpus_per_worker:g}); "
                f"the cluster has {gpus:g}",
            )
        if resources.gpus_per_worker > node_gpus:
            raise JobSpecError(
                "resources.gpus_per_worker",
                f"a worker needs {resources.gpus_per_worker:g} GPUs on one node; the cluster's largest node has "
                f"{node_gpus:g}",
            )


def cluster_resources(address: str) -> tuple[float, float, tuple[float, float]]:
    """(CPUs, GPUs, the largest node's (CPUs, GPUs)) of the running Ray cluster at ``address``, asked before the
    command writes anything: a cluster too small for a trial is refused with nothing started or written. Connects
    once, quietly, and disconnects."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise JobSpecError("--address", f"no Ray cluster answers at {address!r} ({exception_line(error)})") from None
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()
    cpus, gpus = ([node.get(kind, 0.0) for node in nodes] or [0.0] for kind in ("CPU", "GPU"))
    return sum(cpus), sum(gpus), (max(cpus), max(gpus))


def local_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the Ray instance ``sdtune`` would start on this machine."""
    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


# What every trial's worker imports (a fresh process per trial): where these have no compiled bytecode, each
# worker compiles their sources again.
WORKER_PACKAGES = ("torch", "transformers", "deepspeed")


def missing_bytecode(packages: Sequence[str] = WORKER_PACKAGES) -> dict[str, Path]:
    """{package: the directory it is installed in} for the installed ``packages`` without compiled bytecode
    (installed with ``pip --no-compile``, or in an image built under ``PYTHONDONTWRITEBYTECODE``): every trial's
    processes compile them again, which doubles a trial's start-up (docs/benchmarks.md). Looks at each package's
    ``__init__`` only."""
    missing = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.cached and not os.path.exists(spec.cached):
            missing[name] = Path(spec.origin).parents[1]
    return missing
