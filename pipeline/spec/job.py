"""The job spec: one YAML file that describes a sweep, validated before anything starts.

``load_job("jobs/rte.yaml", ["training.lr=1e-3"])`` gives a :class:`JobSpec`; every problem with the file, an
override or a value is a :class:`JobSpecError` whose one-line message starts with the dotted path of the field
(``"training.lr: Input should be greater than 0"``), so a sweep never fails in its trials over a typo.
"""

from __future__ import annotations

import importlib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from functools import reduce
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializerFunctionWrapHandler,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.spec import yaml_reader as spec_yaml
from pipeline.storage.paths import StoragePath, secret_options, storage_path
from pipeline.tasks.registry import COLUMN_ROLES, DATA_FILE_FORMATS, DATA_SPLITS, get_task
from sdt import SETTINGS, SDTConfig, SDTConfigError, Setting

# Trials may differ only in what they train; resources, tracking and export belong to the sweep as a whole.
SEARCHABLE_SECTIONS: tuple[str, ...] = ("model", "data", "method", "training")
DOMAIN_KINDS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint")
TRIAL_CONTEXT = "trial"  # validation context flag: the spec of one trial (see parse_job)


class JobSpecError(ValueError):
    """A job spec that cannot run. ``str()`` is one line: ``"<where>: <reason>"``, where ``where`` is the
    dotted field path (or the file / override at fault) and ``source`` names the spec it came from."""

    def __init__(self, where: str, reason: str, source: str = "<spec>") -> None:
        self.where, self.reason, self.source = where, _one_line(reason), source
        super().__init__(f"{where}: {self.reason}")

    def __reduce__(self):  # picklable, so a failure inside a Ray task reaches the driver as itself
        return type(self), (self.where, self.reason, self.source)


class _Spec(BaseModel):
    # A misspelt key must fail loudly, not leave its setting at the default; NaN and inf are never meant; and a
    # value of the wrong type is an error, not coerced (`epochs: true` is not 1, `lr: "0.1"` not a number).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _field_error(loc: str | tuple[str, ...], reason: str, value: Any) -> ValidationError:
    """An error placed at ``loc`` (relative to the model raising it), for checks that span several fields.

    Pydantic keeps the locations of a ValidationError raised inside a validator, where a plain ValueError
    would be reported against the whole model.
    """
    error = PydanticCustomError("job_spec", "{reason}", {"reason": reason})
    loc = (loc,) if isinstance(loc, str) else loc
    return ValidationError.from_exception_data("JobSpec", [InitErrorDetails(type=error, loc=loc, input=value)])


class ModelSpec(_Spec):
    """The base model: a pretrained checkpoint, a freshly built architecture, or the builtin tiny base."""

    name_or_path: str | None = None  # HF hub id or local dir, loaded with from_pretrained
    architecture: (
        Literal["mamba", "mamba2", "jamba", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2"] | None
    ) = None
    config: dict[str, Any] = {}  # transformers config kwargs for `architecture`
    builtin: Literal["digits"] | None = None  # the tiny base that `sdtune pretrain` trains and caches
    tokenizer: str | None = None  # None = name_or_path
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [name for name in ("name_or_path", "architecture", "builtin") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"set exactly one of name_or_path, architecture or builtin, got {sources or 'none'}")
        if self.config and self.architecture is None:
            raise _field_error("config", "only builds a fresh model: set architecture, or drop config", self.config)
        return self


class DataSpec(_Spec):
    """What to train and evaluate on, and how to turn it into prompts and answers."""

    task: str = "digits"  # a name from pipeline.tasks.registry.TASKS
    dataset: str | None = None  # HF datasets path for glue / generation, e.g. "nyu-mll/glue"
    subset: str | None = None  # the dataset's config name, e.g. "rte"
    data_files: dict[str, str] | None = None  # split -> local json/jsonl/csv/parquet file
    columns: dict[str, str] = {}  # role (text, text_pair, label, target) -> column name
    instruction: str = ""  # prompt prefix before the input
    label_names: list[str] | None = None  # answer string per class index; None = "0", "1", ...
    kind: Literal["classification", "generation"] | None = None  # for a task whose kind the spec gives ("files")
    max_length: PositiveInt = 512
    # An example longer than max_length: its prompt cut from the left (counted, on the console and in MLflow), or
    # the trial refused with the count.
    too_long: Literal["truncate", "refuse"] = "truncate"
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = None
    validation_fraction: float = Field(0.2, gt=0, lt=1)  # carved from train when there is no validation split
    split_seed: int = 123
    scoring: Literal["strict", "official"] = "strict"  # official drops out-of-label predictions, as GLUE's code does
    num_beams: PositiveInt = 1
    max_new_tokens: PositiveInt = 64

    @field_validator("task")
    @classmethod
    def _registered_task(cls, name: str) -> str:
        get_task(name)
        return name

    @field_validator("columns")
    @classmethod
    def _known_roles(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"unknown roles {unknown}; roles are {', '.join(COLUMN_ROLES)}")
        return columns

    @field_validator("label_names")
    @classmethod
    def _distinct_labels(cls, names: list[str] | None) -> list[str] | None:
        # A repeated answer string would make two classes indistinguishable when scoring generated text.
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise ValueError(f"need at least two distinct answer strings, got {names}")
        return names

    @field_validator("data_files")
    @classmethod
    def _readable_files(cls, files: dict[str, str] | None) -> dict[str, str] | None:
        if files is None:
            return None
        unknown = sorted(set(files) - set(DATA_SPLITS))
        if unknown:
            raise ValueError(f"unknown splits {unknown}; splits are {', '.join(DATA_SPLITS)}")
        if "train" not in files:
            raise ValueError("needs a train file (validation is carved from it when absent)")
        suffixes = {Path(path).suffix.lower() for path in files.values()}
        unreadable = sorted(suffixes - set(DATA_FILE_FORMATS))
        if unreadable:
            raise ValueError(f"cannot read {unreadable} files; use {', '.join(DATA_FILE_FORMATS)}")
        # One `datasets` builder reads every split.
        if len({DATA_FILE_FORMATS[suffix] for suffix in suffixes}) > 1:
            raise ValueError(f"all splits must share one format, got {sorted(suffixes)}")
        return files

    @model_validator(mode="after")
    def _what_the_task_needs(self) -> DataSpec:
        if need := get_task(self.task).unmet(self):
            raise _field_error(need.field, f"task {self.task!r} {need.reason}", None)
        return self


def _count_or_fraction(value: Any) -> Any:
    """Keeps an int an int (a count of frozen entries) and a float a float (a fraction): never coerce one into
    the other. Strings are parsed, since PyYAML reads ``1e-3`` as one."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                pass
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)):
        return value
    raise ValueError(f"expected a float fraction or an int count, got {value!r}")


CountOrFraction = Annotated[StrictInt | StrictFloat | None, BeforeValidator(_count_or_fraction)]


def _setting_type(kind: Any) -> Any:
    """The spec's type for an :class:`sdt.SDTConfig` setting of type ``kind``, None allowed (the preset's value)."""
    if kind in (float | int, float | int | None):  # a count or a fraction: each stays what it is
        return CountOrFraction
    if kind is float:  # strict pydantic would turn an int into a float; the spec keeps the value as written
        return StrictFloat | StrictInt | None
    if typing.get_origin(kind) is tuple:  # YAML has lists, not tuples
        return list[typing.get_args(kind)[0]] | None
    if types.NoneType in (arguments := typing.get_args(kind)) and len(arguments) == 2:  # already optional: X | None
        return _setting_type(next(a for a in arguments if a is not types.NoneType))
    return kind | None


def method_field(sdt_field: str) -> str:
    """The :class:`MethodSpec` field of an :class:`sdt.SDTConfig` field (SDTConfig calls the name ``method``)."""
    return "name" if sdt_field == "method" else sdt_field


def _spec_field(setting: Setting) -> tuple[str, tuple[Any, Any]]:
    """A setting as a field of the spec's method section: ``method`` is ``name`` there, with SDTConfig's default;
    every other field defaults to None, the preset's value."""
    if setting.name == "method":
        return method_field(setting.name), (setting.type, setting.default)
    return setting.name, (_setting_type(setting.type), None)


class _MethodSection(_Spec):
    """What :class:`MethodSpec` does; its fields are made from :data:`sdt.SETTINGS` below."""

    def to_sdt_config(self, seed: int) -> SDTConfig:
        overrides = self.model_dump(exclude={"name"}, exclude_none=True)
        return SDTConfig.preset(self.name, **overrides, seed=seed)

    @model_validator(mode="after")
    def _valid_sdt_config(self) -> _MethodSection:
        try:
            self.to_sdt_config(seed=0)
        except SDTConfigError as error:
            field = method_field(error.field)
            raise _field_error(field, error.reason, getattr(self, field)) from None
        return self


MethodSpec = create_model(
    "MethodSpec",
    __base__=_MethodSection,
    __module__=__name__,
    __doc__="""The fine-tuning method: a preset of :class:`sdt.SDTConfig` (a name from ``sdt.METHODS``); a field left
    at None keeps the preset's value. The fields are sdt's :data:`sdt.SETTINGS` (``name`` is SDTConfig's ``method``;
    its ``seed`` comes from ``training.seed``), and sdt owns every rule about them.""",
    **dict(_spec_field(setting) for setting in SETTINGS),
)


class TrainingSpec(_Spec):
    """Optimisation, evaluation and checkpointing of one trial."""

    epochs: PositiveInt = 3
    max_steps: PositiveInt | None = None  # caps the optimizer steps of the training phase
    batch_size: PositiveInt = 4  # per-worker micro-batch
    gradient_accumulation: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    warmup_lr: PositiveFloat | None = None  # lr of the SDT warmup phase; None = lr
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO's optimizer state (and fp32 master weights) in host memory
    offload_parameters: bool = False  # ZeRO-3's partitioned parameters in host memory
    # Extra DeepSpeed config, merged over the one sdtune writes (e.g. {zero_optimization:
    # {stage3_param_persistence_threshold: 0}}); keys sdtune sets from the spec keep the spec's value.
    deepspeed: dict[str, Any] = {}
    eval_every_steps: PositiveInt | None = None  # evaluate and checkpoint this often, besides after every epoch
    log_every_steps: PositiveInt = 10  # the train loss of every Nth optimizer step goes to MLflow (train/step_loss)
    # A worker that dies (killed, out of memory, a lost node) restarts its trial's worker group from the last
    # checkpoint this many times before the trial fails; a diverged loss is never retried.
    max_failures: NonNegativeInt = 2
    eval_batch_size: PositiveInt = 8
    seed: int = 42
    # How micro-batches are laid out (pipeline.tasks.batching): auto packs several examples per row where the model
    # keeps them apart exactly (Mamba-2 on sdt's fused path) and groups rows by length elsewhere; grouped and padded
    # force those layouts (padded: today's shuffled batches, each row padded to its batch's longest).
    batching: Literal["auto", "grouped", "padded"] = "auto"

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainingSpec:
        if self.offload_parameters and self.zero_stage != 3:
            raise _field_error("offload_parameters", "only ZeRO-3 partitions parameters; set zero_stage: 3", True)
        if self.offload_optimizer and self.zero_stage == 0:
            raise _field_error("offload_optimizer", "needs ZeRO (zero_stage 1, 2 or 3)", True)
        return self


class ResourcesSpec(_Spec):
    """What each trial asks Ray for."""

    num_workers: PositiveInt = 1
    use_gpu: bool | None = None  # None = use GPUs when the cluster has any
    gpus_per_worker: PositiveFloat = 1.0  # below 1, trials share a GPU
    cpus_per_worker: PositiveFloat = 1.0
    trial_cpus: PositiveFloat = 0.5  # the Tune driver function; Ray rejects 0
    max_concurrent_trials: PositiveInt = 1
    # When the running trials' GPUs fill the cluster, Tune starts one trial more: its Ray processes (Tune function,
    # Train controller) start while the others train and its worker group waits for a GPU, so the GPU idles only
    # for the worker's own start when one frees. None: on a Ray instance sdtune starts itself, not on a cluster it
    # connects to, whose autoscaler could add a node for the waiting trial.
    stage_next_trial: bool | None = None

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus_above_one(cls, gpus: float) -> float:
        # Ray only hands out fractions of a single GPU.
        if gpus > 1 and not gpus.is_integer():
            raise ValueError(f"more than one GPU must be a whole number, got {gpus}")
        return gpus

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> ResourcesSpec:
        # Ray may place two workers of one trial on the same GPU, and NCCL refuses two ranks on one device.
        if self.use_gpu is not False and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise _field_error(
                "gpus_per_worker",
                f"{self.num_workers} workers of one trial cannot share GPUs (NCCL needs one GPU per rank); "
                "use a whole GPU per worker or num_workers: 1",
                self.gpus_per_worker,
            )
        return self


class Domain(_Spec):
    """The values one searched field takes: exactly one of the keys, as in Ray Tune."""

    grid: Annotated[list[Any], Field(min_length=1)] | None = None  # every value, in every sample
    choice: Annotated[list[Any], Field(min_length=1)] | None = None
    # YAML gives lists: a pair is taken from a list of two (strict mode would want a tuple).
    uniform: tuple[float, float] | None = Field(None, strict=False)
    loguniform: tuple[float, float] | None = Field(None, strict=False)
    randint: tuple[StrictInt, StrictInt] | None = Field(None, strict=False)  # [lo, hi), hi excluded as in tune.randint

    @model_serializer(mode="wrap")
    def _only_the_set_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {kind: values for kind, values in handler(self).items() if values is not None}

    @property
    def kind(self) -> str:
        return next(kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None)

    def candidates(self) -> list[Any]:
        """The values a spec check tries: all of a grid or choice, the end points of a range."""
        if self.kind in ("grid", "choice"):
            return getattr(self, self.kind)
        lo, hi = getattr(self, self.kind)
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    @model_validator(mode="after")
    def _one_valid_kind(self) -> Domain:
        kinds = [kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None]
        if len(kinds) != 1:
            raise ValueError(f"set exactly one of {', '.join(DOMAIN_KINDS)}, got {kinds or 'none'}")
        if kinds[0] in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kinds[0])
            if lo >= hi:
                raise _field_error(kinds[0], f"needs lo < hi, got [{lo}, {hi}]", [lo, hi])
            if kinds[0] == "loguniform" and lo <= 0:
                raise _field_error(kinds[0], f"needs lo > 0, got {lo}", [lo, hi])
        return self


def _unsearchable(key: str) -> str | None:
    """Why ``key`` cannot be searched, or None when it is a dotted path to a field trials may vary."""
    section: type[BaseModel] | None = JobSpec
    walked: list[str] = []
    for part in key.split("."):
        if section is None:
            return f"{'.'.join(walked)} has no fields"
        if part not in section.model_fields:
            return "no such field"
        walked.append(part)
        annotation = section.model_fields[part].annotation
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if walked[0] not in SEARCHABLE_SECTIONS:
        return f"not searchable; trials vary only {', '.join(SEARCHABLE_SECTIONS)}"
    return None


class SearchSpec(_Spec):
    """The sweep: what to optimise, how to sample trials and when to stop them."""

    metric: str = "eval/accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: PositiveInt = 1
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Literal["asha", "fifo"] = "fifo"
    grace_period: PositiveInt = 1  # ASHA, in reports (epochs or eval_every_steps)
    reduction_factor: float = Field(2.0, gt=1)  # ASHA
    # Trials whose SDT warmups would be identical compute it once (pipeline.trial.warmup); off, every trial computes its
    # own (to measure what sharing saves).
    share_warmup: bool = True
    space: dict[str, Domain] = {}  # dotted path into the job spec -> its values, e.g. "training.lr"

    @property
    def planned_trials(self) -> int:
        """How many trials the sweep runs: ``num_samples`` of each combination of the grids (optuna has none)."""
        return self.num_samples * math.prod(len(domain.grid) for domain in self.space.values() if domain.grid)

    @model_validator(mode="after")
    def _searchable_space(self) -> SearchSpec:
        for key, domain in self.space.items():
            if reason := _unsearchable(key):
                raise _field_error(("space", key), reason, key)
            # Ray Tune expands grid values only in its basic (grid / random) search; optuna samples.
            if domain.kind == "grid" and self.algorithm == "optuna":
                raise _field_error(("space", key), "optuna cannot search a grid; use choice", domain.grid)
            overlapping = [other for other in self.space if other.startswith(f"{key}.")]
            if overlapping:
                raise _field_error(("space", key), f"overlaps {overlapping[0]}; search one or the other", key)
        return self


class TrackingSpec(_Spec):
    """Where MLflow records the sweep."""

    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///<sweep dir>/mlflow.db
    experiment: str | None = None  # None = the job name


class ExportSpec(_Spec):
    """What happens to the best trial's adapter."""

    dir: str | None = None  # None = <sweep dir>/export
    merge: bool = False
    register_model: bool = True  # in the MLflow model registry, with the alias "champion"
    registered_model_name: str | None = None


class JobSpec(_Spec):
    """One sweep: a model, data, a fine-tuning method and how to search its hyperparameters."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)  # a directory and an MLflow experiment name
    # Python modules imported before the spec is validated, by the command and by every trial's processes: where
    # your own methods (sdt.register_method) and tasks (pipeline.tasks.registry.register_task) register themselves.
    imports: list[str] = []
    # The sweep lives in <output_dir>/<name>: a local directory, or object storage (s3://bucket/prefix?options,
    # any URI pyarrow.fs opens; credentials from the environment), see pipeline.storage.paths.
    output_dir: str = "runs"
    model: ModelSpec
    data: DataSpec = DataSpec()
    method: MethodSpec = MethodSpec()
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    search: SearchSpec = SearchSpec()
    tracking: TrackingSpec = TrackingSpec()
    export: ExportSpec = ExportSpec()

    @property
    def sweep_dir(self) -> StoragePath:
        return storage_path(self.output_dir) / self.name

    def with_absolute_paths(self) -> JobSpec:
        """A copy whose relative paths (output_dir, data files, a local model) are resolved against the current
        directory: Ray workers run elsewhere. Only paths change, so the copy is not validated again."""
        data = self.data
        if data.data_files:
            data = data.model_copy(
                update={"data_files": {k: str(Path(v).resolve()) for k, v in data.data_files.items()}}
            )
        model = self.model
        if model.name_or_path and Path(model.name_or_path).exists():
            model = model.model_copy(update={"name_or_path": str(Path(model.name_or_path).resolve())})
        output_dir = str(storage_path(self.output_dir).resolve())
        return self.model_copy(update={"output_dir": output_dir, "data": data, "model": model})

    def with_overrides(self, values: Mapping[str, Any]) -> JobSpec:
        """A validated copy with each dotted path in ``values`` set: a trial's spec from its sampled values. The
        search space is not checked again (the sweep's spec was)."""
        data = self.model_dump()
        for key, value in values.items():
            # Ray Tune samples randint / choice values as numpy scalars; the spec's strict types want Python's.
            plain = value.item() if hasattr(value, "item") and not isinstance(value, list | dict) else value
            _set_path(data, key, plain, source="overrides")
        return parse_job(data, source="overrides", trial=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @field_validator("name")
    @classmethod
    def _not_a_relative_dir(cls, name: str) -> str:
        if set(name) == {"."}:
            raise ValueError(f"{name!r} would put the sweep outside output_dir")
        return name

    @field_validator("output_dir")
    @classmethod
    def _no_credentials(cls, output_dir: str) -> str:
        if secrets := secret_options(output_dir):
            raise ValueError(
                f"the URI carries credentials ({', '.join(secrets)}), which would be written into job.yaml, Ray's "
                "state and MLflow; give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)"
            )
        return output_dir

    @model_validator(mode="after")
    def _merge_needs_a_mergeable_method(self) -> JobSpec:
        config = self.method.to_sdt_config(seed=self.training.seed)
        if self.export.merge and not config.mergeable:
            reason = (
                f"method {config.method!r} trains a state {config.state}, which cannot be merged into weights; "
                "set export.merge: false"
            )
            raise _field_error(("export", "merge"), reason, True)
        return self

    @model_validator(mode="after")
    def _space_values_fit(self, info: ValidationInfo) -> JobSpec:
        # Every value must be valid with the rest of the spec as written, so no trial fails on it. Combinations
        # of searched values are not tried. A trial's own spec (with_overrides) skips this: its sweep's spec passed.
        if info.context and info.context.get(TRIAL_CONTEXT):
            return self
        for key, domain in self.search.space.items():
            for value in domain.candidates():
                if reason := self._unfit(key, value, domain):
                    raise _field_error(("search", "space", key), f"value {value!r} fails: {reason}", value)
        return self

    def _unfit(self, key: str, value: Any, domain: Domain) -> str | None:
        """Why setting ``key`` to ``value`` breaks the spec (its section, or a rule across sections such as
        ZeRO-3 with adapters), or None. Validated as a trial's spec, so the check does not recurse."""
        data = self.model_dump()
        _set_path(data, key, value)
        try:
            trial = JobSpec.model_validate(data, context={TRIAL_CONTEXT: True})
        except ValidationError as error:
            where, reason = _first_error(error)
            return reason if where == key else f"{where}: {reason}"
        if domain.kind in ("uniform", "loguniform") and isinstance(reduce(getattr, key.split("."), trial), int):
            return f"{domain.kind} draws floats and the field takes integers; use randint or choice"
        return None


class TrialSpecs:
    """The resolved spec of each trial of a sweep: the sweep's spec with the trial's sampled values, validated once
    per trial (the first time anyone asks) and handed to everyone after: the sweep's callbacks and its outcomes."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self._by_trial: dict[str, JobSpec] = {}

    def of(self, trial_id: str, config: Mapping[str, Any]) -> JobSpec:
        if trial_id not in self._by_trial:
            self._by_trial[trial_id] = self.spec.with_overrides(config)
        return self._by_trial[trial_id]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_error(error: ValidationError) -> tuple[str, str]:
    """The dotted location and message of the first error, without pydantic's "Value error, " prefix."""
    first = error.errors(include_url=False)[0]
    loc, reason = [str(part) for part in first["loc"]], first["msg"].removeprefix("Value error, ")
    # A search space key is a dotted path itself, so a location inside its domain would read like a deeper field.
    if loc[:2] == ["search", "space"] and len(loc) > 3:
        loc, reason = loc[:3], f"{'.'.join(loc[3:])}: {reason}"
    return ".".join(loc), reason


def _set_path(data: dict[str, Any], key: str, value: Any, source: str = "<spec>") -> None:
    """Sets ``data["a"]["b"]["c"] = value`` for key ``"a.b.c"``, creating mappings where a level is missing."""
    parts = key.split(".")
    if not all(parts):
        raise JobSpecError(key, "a key is dot-separated field names, e.g. training.lr", source)
    if parts[:2] == ["search", "space"] and len(parts) > 2:
        parts = [*parts[:2], ".".join(parts[2:])]  # a search space key is a dotted path itself
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise JobSpecError(where, f"is a {type(child).__name__}, not a section, so {key} cannot be set", source)
        node = child
    node[parts[-1]] = value


def parse_job(data: Mapping[str, Any], source: str = "<spec>", trial: bool = False) -> JobSpec:
    """Validates an already-loaded spec; ``source`` names it in :attr:`JobSpecError.source`. ``trial``: the spec of
    one trial of a validated sweep, whose search space needs no second check."""
    if not isinstance(data, Mapping):
        raise JobSpecError(source, f"the spec must be a mapping, got {type(data).__name__}", source)
    import_modules(data.get("imports", []), source)
    try:
        return JobSpec.model_validate(data, context={TRIAL_CONTEXT: trial})
    except ValidationError as error:
        where, reason = _first_error(error)
        raise JobSpecError(where or "spec", reason, source) from error


def import_modules(modules: Any, source: str = "<spec>") -> None:
    """Imports the spec's ``imports`` (a module registers its methods and tasks when imported); each failure is a
    :class:`JobSpecError` naming the module."""
    if not isinstance(modules, list) or not all(isinstance(module, str) for module in modules):
        raise JobSpecError("imports", f"a list of module names, got {modules!r}", source)
    for position, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except Exception as error:
            raise JobSpecError(
                f"imports.{position}", f"cannot import {module!r}: {type(error).__name__}: {error}", source
            ) from None


def load_job(path: str | StoragePath, overrides: Sequence[str] = ()) -> JobSpec:
    """Reads a YAML job spec and applies ``overrides`` (``"training.lr=1e-4"``; values are parsed as YAML)."""
    source = str(path)
    try:
        text = storage_path(path).read_bytes().decode("utf-8")
    except OSError as error:
        raise JobSpecError(source, f"cannot read the job spec: {error.strerror or error}", source) from error
    except UnicodeDecodeError as error:
        raise JobSpecError(source, f"not a UTF-8 text file (byte {error.start}): a job spec is YAML", source) from None
    except ValueError as error:  # a URI that pyarrow cannot open
        raise JobSpecError(source, f"cannot read the job spec: {error}", source) from None
    try:
        data = spec_yaml.load(text)
    except spec_yaml.SpecYAMLError as error:
        raise JobSpecError(source, f"invalid YAML: {error}", source) from None
    if not isinstance(data, dict):
        raise JobSpecError(source, f"the spec must be a mapping, got {type(data).__name__}", source)
    for override in overrides:
        key, equals, text = override.partition("=")
        if not equals or not key.strip():
            raise JobSpecError(override, "an override must look like dotted.key=value", source)
        try:
            value = spec_yaml.load(text)
        except spec_yaml.SpecYAMLError as error:
            raise JobSpecError(override, f"invalid YAML value: {error}", source) from None
        _set_path(data, key.strip(), value, source)
    return parse_job(data, source)


__all__ = [
    "DataSpec",
    "Domain",
    "ExportSpec",
    "JobSpec",
    "JobSpecError",
    "MethodSpec",
    "ModelSpec",
    "ResourcesSpec",
    "SearchSpec",
    "TrackingSpec",
    "TrainingSpec",
    "TrialSpecs",
    "load_job",
    "parse_job",
]
