"""The shared-warmup key and store, without Ray: what the key covers, and that a warmup is published whole (its
marker last) on local disk and in object storage. Sharing it between trials through Ray:
tests/test_warmup_sharing.py."""

from __future__ import annotations

import pytest
import torch

from pipeline.spec.job import parse_job
from pipeline.storage.paths import content_hash, storage_path
from pipeline.trial.warmup import UPDATES_FILE, WarmupStore, warmup_key

BASE = {
    "name": "w",
    "model": {"builtin": "digits"},
    "method": {"name": "sdlora", "channels_frozen": 0.9, "states_frozen": 0.75, "warmup_steps": 20},
    "training": {"lr": 1e-2, "warmup_lr": 1e-2, "batch_size": 8},
}


def key(overrides: dict | None = None, total_steps: int = 100, world: int = 1, device: str = "cpu") -> str:
    spec = parse_job(BASE).with_overrides(overrides or {})
    return content_hash(warmup_key(spec, total_steps, world, torch.device(device)))


GLUE = {"data.task": "glue", "data.dataset": "nyu-mll/glue", "data.subset": "rte"}
FILES = {"data.task": "files", "data.kind": "classification", "data.data_files": {"train": "a.jsonl"}}
ARCHITECTURE = {"model.builtin": None, "model.architecture": "mamba"}
ZERO3 = {"training.zero_stage": 3}
NO_WARMUP_LR = {"training.warmup_lr": None}
# Every setting that changes what the warmup computes: (the setting, the spec it is flipped in, the flip).
SHAPES_THE_WARMUP = [
    ("model.name_or_path", {}, {"model.builtin": None, "model.name_or_path": "state-spaces/mamba-130m-hf"}),
    ("model.architecture", {}, ARCHITECTURE),
    ("model.config", ARCHITECTURE, {"model.config": {"hidden_size": 32}}),
    ("model.builtin", ARCHITECTURE, {"model.architecture": None, "model.builtin": "digits"}),
    ("model.tokenizer", {}, {"model.tokenizer": "EleutherAI/gpt-neox-20b"}),
    ("model.dtype", {}, {"model.dtype": "bfloat16"}),  # auto is fp32 on the CPU
    ("model.trust_remote_code", {}, {"model.trust_remote_code": True}),
    ("data.task", {}, {"data.task": "synthetic"}),
    ("data.dataset", GLUE, {"data.dataset": "someone/glue"}),
    ("data.subset", GLUE, {"data.subset": "mrpc"}),
    ("data.data_files", FILES, {"data.data_files": {"train": "b.jsonl"}}),
    ("data.kind", FILES, {"data.kind": "generation"}),
    ("data.columns", FILES, {"data.columns": {"text": "sentence"}}),
    ("data.instruction", {}, {"data.instruction": "Which digit? "}),
    ("data.label_names", {}, {"data.label_names": [str(d) for d in range(10)]}),
    ("data.max_length", {}, {"data.max_length": 64}),
    ("data.max_train_samples", {}, {"data.max_train_samples": 100}),
    ("data.validation_fraction", {}, {"data.validation_fraction": 0.3}),
    ("data.split_seed", {}, {"data.split_seed": 7}),
    ("method.name", {}, {"method.name": "sdt"}),
    ("method.lora_rank", {}, {"method.lora_rank": 4}),  # the LoRA that trains beside the dense delta
    ("method.lora_alpha", {}, {"method.lora_alpha": 16.0}),
    ("method.lora_targets", {}, {"method.lora_targets": ["out_proj", "x_proj"]}),
    ("method.lora_variant", {}, {"method.lora_variant": "dora"}),
    # a hybrid's attention, MLP and expert LoRA trains beside the dense delta too
    ("method.attention_lora_targets", {}, {"method.attention_lora_targets": ["q"]}),
    ("method.mlp_lora_targets", {}, {"method.mlp_lora_targets": ["up"]}),
    ("method.expert_lora_targets", {}, {"method.expert_lora_targets": ["up"]}),
    ("method.sdt_targets", {}, {"method.sdt_targets": ["A_log"]}),
    ("method.warmup_steps", {}, {"method.warmup_steps": 10}),
    ("training.batch_size", {}, {"training.batch_size": 16}),
    ("training.batching", {}, {"training.batching": "grouped"}),
    ("training.gradient_accumulation", {}, {"training.gradient_accumulation": 2}),
    ("training.lr", NO_WARMUP_LR, {"training.lr": 3e-2}),  # the warmup's lr when warmup_lr is not set
    ("training.warmup_lr", {}, {"training.warmup_lr": 3e-2}),
    ("training.weight_decay", {}, {"training.weight_decay": 0.1}),
    ("training.grad_clip", {}, {"training.grad_clip": 0.5}),
    ("training.zero_stage", {}, ZERO3),
    ("training.offload_optimizer", {}, {"training.offload_optimizer": True}),  # AdamW steps on the host
    ("training.offload_parameters", ZERO3, {"training.offload_parameters": True}),
    ("training.deepspeed", {}, {"training.deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}}}),
    ("training.seed", {}, {"training.seed": 1}),
    ("resources.cpus_per_worker", {}, {"resources.cpus_per_worker": 2.0}),  # a CPU worker's torch threads
]
# Settings that act only after the warmup, or not on what it computes: flipped, the key stays.
LEAVE_IT = [
    ("data.too_long", {}, {"data.too_long": "refuse"}),  # refused, a trial never warms up
    ("method.channels_frozen", {}, {"method.channels_frozen": 0.8}),  # the selection's ratios
    ("method.states_frozen", {}, {"method.states_frozen": 0.5}),
    ("method.inputs_frozen", {}, {"method.inputs_frozen": 0.9}),
    ("training.lr", {}, {"training.lr": 3e-2}),  # the training phase's, with warmup_lr set
    ("training.eval_every_steps", {}, {"training.eval_every_steps": 5}),
    ("training.log_every_steps", {}, {"training.log_every_steps": 1}),
    ("training.max_failures", {}, {"training.max_failures": 0}),
    ("training.eval_batch_size", {}, {"training.eval_batch_size": 3}),
    ("data.max_eval_samples", {}, {"data.max_eval_samples": 10}),
    ("data.scoring", {}, {"data.scoring": "official"}),
    ("data.num_beams", {}, {"data.num_beams": 4}),
    ("data.max_new_tokens", {}, {"data.max_new_tokens": 8}),
    ("resources.cpus_per_worker", {}, {"resources.cpus_per_worker": 1.5}),  # the same whole CPU: one thread
    ("resources.gpus_per_worker", {}, {"resources.gpus_per_worker": 0.5}),
    ("resources.trial_cpus", {}, {"resources.trial_cpus": 1.0}),
    ("resources.max_concurrent_trials", {}, {"resources.max_concurrent_trials": 4}),
    ("resources.stage_next_trial", {}, {"resources.stage_next_trial": True}),
]
# Settings that reach the warmup through the key's other arguments: the run's optimizer steps (the lr decays over
# the whole run), the world size and the device.
THROUGH_ARGUMENTS = {"training.epochs", "training.max_steps", "resources.num_workers", "resources.use_gpu"}


def test_every_setting_a_trial_runs_with_is_classified():
    """A new setting of the spec must be added to one of the lists above: whether it changes the warmup is decided,
    not forgotten."""
    spec = parse_job(BASE)
    sections = {name: type(getattr(spec, name)) for name in ("model", "data", "method", "training", "resources")}
    settings = {f"{name}.{field}" for name, section in sections.items() for field in section.model_fields}
    classified = {case[0] for case in SHAPES_THE_WARMUP + LEAVE_IT} | THROUGH_ARGUMENTS
    assert classified == settings


@pytest.mark.parametrize(("setting", "base", "flip"), SHAPES_THE_WARMUP, ids=[c[0] for c in SHAPES_THE_WARMUP])
def test_a_setting_that_shapes_the_warmup_changes_the_key(setting, base, flip):
    assert key({**base, **flip}) != key(base)


@pytest.mark.parametrize(("setting", "base", "flip"), LEAVE_IT, ids=[c[0] for c in LEAVE_IT])
def test_a_setting_that_acts_after_the_warmup_leaves_the_key(setting, base, flip):
    assert key({**base, **flip}) == key(base)


def test_the_run_length_world_size_and_device_change_the_key():
    keys = [key(), key(total_steps=200), key(world=2), key(device="cuda")]
    assert len(set(keys)) == len(keys)
    # A GPU worker's CPUs do not enter its arithmetic, and the sweep's name and directory never do.
    assert key({"resources.cpus_per_worker": 2.0}, device="cuda") == key(device="cuda")
    assert key({"name": "other", "output_dir": "elsewhere", "search.share_warmup": False}) == key()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_warmup_is_published_whole_and_loaded_bit_exact(where, tmp_path, request):
    sweep_dir = tmp_path if where == "local" else storage_path(request.getfixturevalue("s3_bucket")) / "warmup-store"
    store = WarmupStore(sweep_dir)
    digest = content_hash(warmup_key(parse_job(BASE), 100, 1, torch.device("cpu")))
    updates = {"backbone.layers.0.mixer": {"A_log": torch.randn(8, 4), "x_proj": torch.randn(3, 8)}}
    # the updates alone, as an upload cut short before its marker leaves them: not a published warmup
    store.entry(digest).mkdir(parents=True)
    (store.entry(digest) / UPDATES_FILE).write_bytes(b"partial")
    assert not store.published(digest) and store.load(digest) is None

    store.publish(digest, updates, {"hash": digest, "computed_by": "trial-a", "metrics": {"warmup/loss": 1.5}})
    loaded, info = store.load(digest)
    assert store.published(digest) and info["computed_by"] == "trial-a"
    mixer = updates["backbone.layers.0.mixer"]
    assert loaded["backbone.layers.0.mixer"].keys() == mixer.keys()
    assert all(torch.equal(loaded["backbone.layers.0.mixer"][k], mixer[k]) for k in mixer)
