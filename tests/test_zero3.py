"""DeepSpeed's ZeRO stages with sdt's weight-space adapters (CPU, gloo): every stage trains the same adapter values.

Two real DeepSpeed ranks (torch.multiprocessing, gloo) train each of lora, sdlora (training phase, a fixed
selection), full fine-tuning and the state methods (sdt.state: a state tensor no kernel reads as a weight) on tiny
Mamba, Mamba-2 and Jamba models for a few steps through ``pipeline.trial.worker.make_engine``, under ZeRO-0, ZeRO-2
and ZeRO-3 with every parameter partitioned (``stage3_param_persistence_threshold: 0``: tiny models would otherwise
keep every parameter whole and test nothing). One rank runs ZeRO-0 against a plain torch loop (AdamW,
``clip_grad_norm_``, the linear schedule): the engine's lightened stage 0 (``pipeline.trial.worker.lighten_stage0``)
must be the same optimizer. Gradient clipping is set low enough to act at every step. The adapters (gathered) must
agree to fp32 rounding. The trial-level run (Ray Train, checkpoints, resume, export) is in tests/test_trial.py.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from processes import free_port
from safetensors.torch import load_file, save_file

ARCHS = ("mamba", "mamba2", "jamba")
METHODS = ("lora", "sdlora", "full", "state-offset", "initial-state")
STEPS = 3
GRAD_CLIP = 0.05  # below every tiny model's gradient norm, so clipping changes every step


def train_all(rank: int, world: int, port: int, model_dirs: dict[str, str], out: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
        }
    )
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import sdt
    from pipeline.spec.job import parse_job
    from pipeline.trial.worker import gathered, make_engine

    torch.distributed.init_process_group("gloo")  # as Ray Train does; DeepSpeed takes it up in make_engine
    for arch in ARCHS:
        for method in METHODS:
            for stage in (0, 2, 3) if world > 1 else ("plain", 0):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32)
                config = {
                    "lora": sdt.SDTConfig.preset("lora", lora_targets=("in_proj", "out_proj")),
                    "sdlora": sdt.SDTConfig.preset("sdlora", channels_frozen=2, states_frozen=0.5, inputs_frozen=0.5),
                    "full": sdt.SDTConfig.preset("full"),
                    "state-offset": sdt.SDTConfig.preset("state-offset"),
                    "initial-state": sdt.SDTConfig.preset("initial-state", lora_targets=("out_proj",)),
                }[method]
                # a fixed selection from fixed pseudo-updates: the training phase of sdlora
                updates = (
                    {
                        p: {k: torch.linspace(-1, 1, v.numel()).reshape(v.shape) for k, v in u.items()}
                        for p, u in sdt.apply(AutoModelForCausalLM.from_pretrained(model_dirs[arch]), config)
                        .warmup_updates()
                        .items()
                    }
                    if method == "sdlora"
                    else None
                )
                tuner = sdt.Tuner(model, config, selection=sdt.select(model, config, updates) if updates else None)
                spec = parse_job(
                    {
                        "name": "z",
                        "model": {"builtin": "digits"},
                        "training": {
                            "zero_stage": 0 if stage == "plain" else stage,
                            "batch_size": 2,
                            "lr": 1e-2,
                            "grad_clip": GRAD_CLIP,
                            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
                        },
                    }
                )
                generator = torch.Generator().manual_seed(100 + rank)
                batches = [torch.randint(1, 64, (2, 12), generator=generator) for _ in range(STEPS)]
                if stage == "plain":
                    train_plain(tuner, spec.training.lr, batches)
                    engine = None
                else:
                    engine = make_engine(tuner, spec, spec.training.lr, total_steps=100)
                    # DeepSpeed's throughput timer would wait for the device at every step
                    assert not engine.tput_timer.config.enabled
                    for tokens in batches:
                        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
                        engine.step()
                names = [name for name, _ in tuner.named_trainable_parameters()]
                with gathered(engine, tuner.trainable_parameters()) if engine else contextlib.nullcontext():
                    values = {
                        f"{arch}/{method}/{stage}/{name}": p.detach().clone()
                        for name, p in tuner.named_trainable_parameters()
                    }
                    partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
                assert len(values) == len(names)
                if rank == 0:
                    save_file(values, f"{out}/{arch}-{method}-{stage}.safetensors")
                    if stage == 3:
                        Path(f"{out}/{arch}-{method}-partitioned").write_text(str(partitioned))
                if engine is not None:
                    engine.destroy()


def train_plain(tuner, lr: float, batches: list[torch.Tensor]) -> None:
    """What make_engine's stage 0 means on one rank, written with torch alone."""
    params = tuner.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / 100))
    tuner.model.train()
    for tokens in batches:
        tuner.model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def train_in_processes(world: int, model_dirs: dict[str, str], out: Path) -> Path:
    args = (world, free_port(), model_dirs, str(out))
    mp.start_processes(train_all, args=args, nprocs=world, join=True, start_method="spawn")
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory) -> Path:
    return train_in_processes(2, tiny_model_dirs, tmp_path_factory.mktemp("zero3"))


@pytest.fixture(scope="module")
def trained_one_rank(tiny_model_dirs, tmp_path_factory) -> Path:
    return train_in_processes(1, tiny_model_dirs, tmp_path_factory.mktemp("zero0"))


def assert_same_adapters(directory: Path, arch: str, method: str, stage, reference) -> None:
    ours = load_file(directory / f"{arch}-{method}-{stage}.safetensors")
    theirs = load_file(directory / f"{arch}-{method}-{reference}.safetensors")
    assert [k.replace(f"/{stage}/", "/") for k in ours] == [k.replace(f"/{reference}/", "/") for k in theirs]
    moved = 0
    for key, value in theirs.items():
        other = ours[key.replace(f"/{reference}/", f"/{stage}/")]
        torch.testing.assert_close(other, value, atol=2e-6, rtol=1e-5, msg=key)
        moved += int(torch.count_nonzero(value).item() > 0)
    assert moved == len(theirs)  # every adapter tensor trained (LoRA's B left zero, the deltas left zero)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero3_trains_the_adapters_as_zero2_does(trained, arch, method):
    assert int((trained / f"{arch}-{method}-partitioned").read_text()) > 0  # ZeRO-3 really partitioned them
    assert_same_adapters(trained, arch, method, 3, 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero0_trains_the_adapters_as_zero2_does(trained, arch, method):
    assert_same_adapters(trained, arch, method, 0, 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero0_on_one_rank_is_a_plain_clipped_adamw_loop(trained_one_rank, arch, method):
    assert_same_adapters(trained_one_rank, arch, method, 0, "plain")
