import pytest
import yaml

from pipeline.spec.job import JobSpec, JobSpecError, TrialSpecs, load_job, parse_job
from sdt import SDTConfig

FULL_SPEC = """
name: rte-sdlora
output_dir: /tmp/sweeps
model:
  name_or_path: state-spaces/mamba-130m-hf
  tokenizer: EleutherAI/gpt-neox-20b
  dtype: bfloat16
data:
  task: glue
  dataset: nyu-mll/glue
  subset: rte
  columns: {text: sentence1, text_pair: sentence2, label: label}
  instruction: "Does the first sentence entail the second? "
  label_names: ["yes", "no"]
  max_length: 256
  max_train_samples: 1000
  scoring: official
method:
  name: sdlora
  lora_rank: 4
  lora_alpha: 1.0e+1
  lora_targets: [in_proj, out_proj]
  channels_frozen: 12
  states_frozen: 0.75
  warmup_steps: 20
training:
  epochs: 5
  max_steps: 300
  batch_size: 8
  gradient_accumulation: 2
  lr: 1e-3
  warmup_lr: 1e-2
  weight_decay: 0.01
  zero_stage: 1
  eval_every_steps: 50
  seed: 7
resources:
  num_workers: 2
  use_gpu: true
  gpus_per_worker: 2
  cpus_per_worker: 4
  trial_cpus: 1
  max_concurrent_trials: 2
search:
  metric: eval/accuracy
  mode: max
  num_samples: 3
  algorithm: random
  scheduler: asha
  grace_period: 2
  reduction_factor: 3
  space:
    training.lr: {loguniform: [1e-4, 1e-2]}
    method.lora_rank: {choice: [2, 4, 8]}
    method.name: {grid: [sdlora, lora]}
    training.batch_size: {randint: [4, 17]}
    method.channels_frozen: {uniform: [0.9, 0.99]}
tracking:
  uri: sqlite:///tmp/mlflow.db
  experiment: rte
export:
  dir: /tmp/export
  merge: true
  register_model: false
  registered_model_name: mamba-rte
"""

MINIMAL = {"name": "tiny", "model": {"builtin": "digits"}}


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(**sections) -> dict:
    return {**MINIMAL, **sections}


def searching(space: dict, **search) -> dict:
    return minimal(search={**search, "space": space})


def test_full_spec_round_trips_through_yaml_on_disk(tmp_path):
    spec = load_job(write(tmp_path, FULL_SPEC))
    assert spec.training.lr == 1e-3 and spec.training.warmup_lr == 1e-2  # PyYAML reads 1e-3 as a string
    assert spec.search.space["training.lr"].loguniform == (1e-4, 1e-2)
    assert spec.search.space["method.name"].kind == "grid"
    assert spec.resources.gpus_per_worker == 2
    assert spec.sweep_dir.as_posix() == "/tmp/sweeps/rte-sdlora"

    reloaded = load_job(write(tmp_path, spec.to_yaml(), "again.yaml"))
    assert reloaded == spec
    assert reloaded.to_yaml() == spec.to_yaml()
    # Only the chosen kind of a search domain is written.
    assert yaml.safe_load(spec.to_yaml())["search"]["space"]["training.lr"] == {"loguniform": [1e-4, 1e-2]}


def test_defaults(tmp_path):
    spec = load_job(write(tmp_path, "name: tiny\nmodel: {builtin: digits}\n"))
    assert spec.sweep_dir.as_posix() == "runs/tiny"
    assert (spec.model.builtin, spec.model.dtype, spec.model.config) == ("digits", "auto", {})
    assert (spec.data.task, spec.data.max_length, spec.data.validation_fraction) == ("digits", 512, 0.2)
    assert spec.method.name == "sdlora" and spec.method.lora_rank is None
    t = spec.training
    assert (t.epochs, t.batch_size, t.lr, t.warmup_lr, t.zero_stage, t.seed) == (3, 4, 1e-3, None, 2, 42)
    r = spec.resources
    assert (r.num_workers, r.use_gpu, r.gpus_per_worker, r.trial_cpus) == (1, None, 1.0, 0.5)
    s = spec.search
    assert (s.metric, s.mode, s.algorithm, s.scheduler, s.space) == ("eval/accuracy", "max", "grid", "fifo", {})
    assert (spec.tracking.uri, spec.tracking.experiment) == (None, None)
    assert (spec.export.dir, spec.export.merge, spec.export.register_model) == (None, False, True)
    assert spec == JobSpec.model_validate(MINIMAL)


def test_overrides_parse_values_as_yaml_and_create_sections(tmp_path):
    path = write(tmp_path, "name: tiny\nmodel: {builtin: digits}\ntraining: {lr: 0.1}\n")
    spec = load_job(
        path,
        [
            "training.lr=1e-4",
            "training.epochs=7",
            "method.lora_targets=[in_proj, x_proj]",
            "resources.use_gpu=false",
            "search.space.training.weight_decay={grid: [0.0, 0.1]}",
            "data.task = files",
            "data.data_files.train=train.jsonl",
            "data.kind=generation",
            "name=renamed",
        ],
    )
    assert spec.training.lr == 1e-4 and isinstance(spec.training.lr, float)
    assert spec.training.epochs == 7 and isinstance(spec.training.epochs, int)
    assert spec.method.lora_targets == ["in_proj", "x_proj"]
    assert spec.resources.use_gpu is False
    assert spec.search.space["training.weight_decay"].grid == [0.0, 0.1]
    assert spec.data.data_files == {"train": "train.jsonl"}
    assert spec.sweep_dir.as_posix() == "runs/renamed"
    # An empty value is null: back to the preset's value.
    assert load_job(path, ["method.lora_rank=4", "method.lora_rank="]).method.lora_rank is None


def test_with_overrides_returns_a_validated_copy():
    spec = parse_job(searching({"training.lr": {"choice": [1e-4, 1e-3]}}))
    trial = spec.with_overrides({"training.lr": 1e-4, "method.lora_rank": 2, "method.states_frozen": 3})
    assert trial.training.lr == 1e-4
    assert (trial.method.lora_rank, trial.method.states_frozen) == (2, 3)
    assert spec.training.lr == 1e-3 and spec.method.lora_rank is None  # the original is untouched
    assert trial.search == spec.search
    with pytest.raises(JobSpecError, match=r"^training\.lr: Input should be greater than 0"):
        spec.with_overrides({"training.lr": -1.0})
    with pytest.raises(JobSpecError, match=r"^training\.lr: Input should be a valid number"):
        spec.with_overrides({"training.lr": "1e-4"})  # strict: a string is not a number (YAML's 1e-4 is a float)


@pytest.mark.parametrize(
    ("written", "expected"),
    [("12", 12), ("0", 0), ("0.99", 0.99), ("1.0", 1.0), ("0.0", 0.0), ("1e-3", 1e-3), ("'7'", 7)],
)
def test_frozen_counts_stay_ints_and_fractions_stay_floats(tmp_path, written, expected):
    spec = load_job(write(tmp_path, "name: tiny\nmodel: {builtin: digits}\n"), [f"method.channels_frozen={written}"])
    value = spec.method.channels_frozen
    assert value == expected and type(value) is type(expected)
    assert type(spec.method.to_sdt_config(seed=0).channels_frozen) is type(expected)
    assert type(load_job(write(tmp_path, spec.to_yaml(), "again.yaml")).method.channels_frozen) is type(expected)


def test_to_sdt_config_applies_the_preset_and_overrides():
    spec = parse_job(minimal(method={"name": "lora", "lora_rank": 3, "lora_targets": ["out_proj"]}))
    assert spec.method.to_sdt_config(seed=5) == SDTConfig.preset(
        "lora", lora_rank=3, lora_targets=("out_proj",), seed=5
    )
    assert parse_job(MINIMAL).method.to_sdt_config(seed=0) == SDTConfig()
    sdt_only = parse_job(minimal(method={"name": "sdt", "states_frozen": 12, "warmup_steps": 10}))
    assert sdt_only.method.to_sdt_config(seed=1) == SDTConfig.preset("sdt", states_frozen=12, warmup_steps=10, seed=1)


MALFORMED = [
    ({"name": "tiny"}, "model"),
    (minimal(model={"builtin": "digits", "name_or_path": "x"}), "model"),
    (minimal(model={}), "model"),
    (minimal(model={"name_or_path": "x", "config": {"hidden_size": 8}}), "model.config"),
    (minimal(model={"architecture": "rwkv"}), "model.architecture"),
    ({"name": "a b", "model": {"builtin": "digits"}}, "name"),
    ({"name": "..", "model": {"builtin": "digits"}}, "name"),
    (minimal(colour="red"), "colour"),
    (minimal(training={"lr": 0}), "training.lr"),
    (minimal(training={"lr": "nan"}), "training.lr"),
    (minimal(training={"lrr": 1e-3}), "training.lrr"),
    (minimal(training={"zero_stage": 4}), "training.zero_stage"),
    (minimal(training={"offload_parameters": True}), "training.offload_parameters"),
    (minimal(training={"max_steps": 0}), "training.max_steps"),
    (minimal(training={"batching": "packed"}), "training.batching"),  # auto packs wherever packing is exact
    (minimal(data={"too_long": "drop"}), "data.too_long"),  # never silently dropped
    (minimal(method={"lora_rank": 0}), "method.lora_rank"),
    (minimal(method={"lora_targets": ["q_proj"]}), "method.lora_targets"),
    (minimal(method={"name": "full", "lora_targets": ["out_proj"]}), "method.name"),
    (minimal(method={"name": "adapter"}), "method.name"),
    (minimal(method={"channels_frozen": 1.5}), "method.channels_frozen"),
    (minimal(method={"states_frozen": "most"}), "method.states_frozen"),
    (minimal(method={"inputs_frozen": True}), "method.inputs_frozen"),
    (minimal(method={"warmup_steps": 0}), "method.warmup_steps"),
    (minimal(method={"name": "state-offset"}, export={"merge": True}), "export.merge"),
    (
        searching({"method": {"grid": [{"name": "initial-state"}]}}) | {"export": {"merge": True}},
        "search.space.method",
    ),
    (minimal(data={"task": "glue"}), "data.dataset"),
    (minimal(data={"task": "files", "kind": "classification"}), "data.data_files"),
    (minimal(data={"task": "files", "data_files": {"train": "t.csv"}}), "data.kind"),
    (minimal(data={"data_files": {"train": "t.txt"}}), "data.data_files"),
    (minimal(data={"data_files": {"validation": "v.json"}}), "data.data_files"),
    (minimal(data={"data_files": {"train": "t.json", "dev": "d.json"}}), "data.data_files"),
    (minimal(data={"data_files": {"train": "t.json", "test": "t.csv"}}), "data.data_files"),
    (minimal(data={"columns": {"sentence": "s"}}), "data.columns"),
    (minimal(data={"label_names": ["yes", "yes"]}), "data.label_names"),
    (minimal(data={"validation_fraction": 1.0}), "data.validation_fraction"),
    (minimal(resources={"gpus_per_worker": 1.5}), "resources.gpus_per_worker"),
    (minimal(resources={"num_workers": 2, "gpus_per_worker": 0.5}), "resources.gpus_per_worker"),
    (minimal(resources={"trial_cpus": 0}), "resources.trial_cpus"),
    (minimal(search={"reduction_factor": 1}), "search.reduction_factor"),
    (searching({"training.lrr": {"grid": [1]}}), "search.space.training.lrr"),
    (searching({"resources.num_workers": {"grid": [1, 2]}}), "search.space.resources.num_workers"),
    (searching({"name": {"choice": ["a", "b"]}}), "search.space.name"),
    (searching({"model.config.hidden_size": {"grid": [8]}}), "search.space.model.config.hidden_size"),
    (searching({"training.lr": {}}), "search.space.training.lr"),
    (searching({"training.lr": [1e-4, 1e-3]}), "search.space.training.lr"),
    (searching({"training.lr": {"grid": [1e-3], "choice": [1e-4]}}), "search.space.training.lr"),
    (searching({"training.lr": {"grid": []}}), "search.space.training.lr"),
    (searching({"training.lr": {"uniform": [0.1, 0.01]}}), "search.space.training.lr"),
    (searching({"training.lr": {"loguniform": [0, 0.1]}}), "search.space.training.lr"),
    (searching({"training.lr": {"choice": [1e-3, -1]}}), "search.space.training.lr"),
    (searching({"training.batch_size": {"uniform": [1, 8]}}), "search.space.training.batch_size"),
    (searching({"method.lora_rank": {"grid": [0, 8]}}), "search.space.method.lora_rank"),
    (searching({"method.lora_rank": {"grid": [4, 8]}}, algorithm="optuna"), "search.space.method.lora_rank"),
    (searching({"method": {"choice": [{}]}, "method.lora_rank": {"choice": [4]}}), "search.space.method"),
]


@pytest.mark.parametrize(("data", "field"), MALFORMED, ids=[f"{i}-{field}" for i, (_, field) in enumerate(MALFORMED)])
def test_malformed_specs_name_the_field(tmp_path, data, field):
    with pytest.raises(JobSpecError) as caught:
        load_job(write(tmp_path, yaml.safe_dump(data)))
    message = str(caught.value)
    assert message.startswith(f"{field}: "), message
    assert "\n" not in message
    assert caught.value.source == str(tmp_path / "job.yaml")


@pytest.mark.parametrize(
    ("text", "overrides", "reason"),
    [
        (None, [], "cannot read the job spec"),
        ("name: [unclosed\n", [], "invalid YAML"),
        ("- name: tiny\n", [], "the spec must be a mapping, got list"),
        ("", [], "the spec must be a mapping, got NoneType"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, text, overrides, reason):
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(JobSpecError) as caught:
        load_job(path, overrides)
    assert str(caught.value).startswith(f"{path}: {reason}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("training.lr", "training.lr"),
        ("=3", "=3"),
        ("training..lr=3", "training..lr"),
        ("name.first=x", "name"),
        ("training.lr=[1, 2", "training.lr=[1, 2"),
    ],
)
def test_malformed_overrides_are_named(tmp_path, override, where):
    path = write(tmp_path, "name: tiny\nmodel: {builtin: digits}\n")
    with pytest.raises(JobSpecError) as caught:
        load_job(path, [override])
    assert str(caught.value).startswith(f"{where}: ")
    assert "\n" not in str(caught.value)


def test_overridden_values_are_validated(tmp_path):
    path = write(tmp_path, "name: tiny\nmodel: {builtin: digits}\n")
    with pytest.raises(JobSpecError, match=r"^training\.batch_size: "):
        load_job(path, ["training.batch_size=many"])


def test_a_trials_spec_is_resolved_once_and_shared():
    spec = parse_job(
        {"name": "t", "model": {"builtin": "digits"}, "search": {"space": {"training.lr": {"grid": [0.1, 0.2]}}}}
    )
    specs = TrialSpecs(spec)
    first = specs.of("a", {"training.lr": 0.1})
    assert first.training.lr == 0.1 and spec.training.lr != 0.1
    assert specs.of("a", {"training.lr": 0.1}) is first  # every later ask gets the object built the first time
    assert specs.of("b", {"training.lr": 0.2}).training.lr == 0.2
