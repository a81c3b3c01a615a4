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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_warmup_is_published_whole_and_loaded_bit_exact(where, tmp_path, request):
    sweep_dir = tmp_path if where == "local" else storage_path(request.getfixturevalue("s3_bucket")) / "warmup-store"
    store = WarmupStore(sweep_dir)
    digest = content_hash(warmup_key(parse_job(BASE), 100, 1, CPU))
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
