"""The shared-warmup key and store, without Ray: what the key covers, and that a published warmup is reused."""

from __future__ import annotations

import torch

from pipeline.config import parse_job
import json

from pipeline.storage import content_hash
from pipeline.warmup import INFO_FILE, WarmupStore, shared_warmup, warmup_key

BASE = {
    "name": "w",
    "model": {"builtin": "digits"},
    "method": {"name": "sdlora", "channels_frozen": 0.9, "states_frozen": 0.75, "warmup_steps": 20},
    "training": {"lr": 1e-2, "warmup_lr": 1e-2, "batch_size": 8},
}
CPU = torch.device("cpu")


def digest(total_steps: int = 100, world: int = 1, **sections) -> str:
    job = {**BASE, **{k: {**BASE.get(k, {}), **v} if isinstance(v, dict) else v for k, v in sections.items()}}
    return content_hash(warmup_key(parse_job(job), total_steps, world, CPU))


def test_the_key_ignores_what_acts_after_the_warmup():
    same = digest()
    assert digest(method={"channels_frozen": 0.8, "states_frozen": 0.5}) == same  # the selection's ratios
    assert digest(training={"lr": 3e-2}) == same  # the training phase's lr, with warmup_lr fixed
    assert digest(data={"max_eval_samples": 10, "num_beams": 4}, training={"eval_batch_size": 3}) == same
    assert digest(name="other", output_dir="elsewhere") == same


def test_the_key_covers_what_shapes_the_warmup():
    same = digest()
    changed = [
        digest(method={"warmup_steps": 10}),
        digest(method={"lora_rank": 4}),  # the LoRA that trains beside the dense delta
        digest(method={"name": "sdt", "lora_targets": []}),
        digest(training={"warmup_lr": 3e-2}),
        digest(training={"seed": 1}),
        digest(training={"batch_size": 16}),
        digest(data={"max_train_samples": 100}),
        digest(total_steps=200),  # the lr decays over the whole run
        digest(world=2),  # the data sharding
    ]
    assert same not in changed and len(set(changed)) == len(changed)


def test_a_published_warmup_is_loaded_not_recomputed(tmp_path):
    store, key = WarmupStore(tmp_path), warmup_key(parse_job(BASE), 100, 1, CPU)
    updates = {"backbone.layers.0.mixer": {"A_log": torch.randn(8, 4)}}
    calls = []

    def compute() -> tuple[dict[str, float], dict]:
        calls.append(1)
        return {"warmup/loss": 1.5}, updates

    first = shared_warmup(store, key, rank=0, trial_name="trial-a", compute=compute)
    second = shared_warmup(store, key, rank=0, trial_name="trial-b", compute=compute)
    assert len(calls) == 1
    assert first[1] == {"warmup/loss": 1.5, "warmup/shared": 0} and second[1] == {"warmup/loss": 1.5, "warmup/shared": 1}
    loaded = second[0]["backbone.layers.0.mixer"]["A_log"]
    assert torch.equal(loaded, updates["backbone.layers.0.mixer"]["A_log"])
    [info_file] = store.root.glob(f"*/{INFO_FILE}")
    info = json.loads(info_file.read_text())
    assert info["computed_by"] == "trial-a" and info["hash"] == content_hash(key)
