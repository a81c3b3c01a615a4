"""DeepSpeed ZeRO-3 with sdt's weight-space adapters, on 2 gloo ranks (CPU): the same adapter values as ZeRO-2.

Two real DeepSpeed ranks (torch.multiprocessing, gloo) train each of lora, sdlora (training phase, a fixed
selection) and full fine-tuning on tiny Mamba, Mamba-2 and Jamba models for a few steps through
``pipeline.train.make_engine``, once under ZeRO-2 and once under ZeRO-3 with every parameter partitioned
(``stage3_param_persistence_threshold: 0``: tiny models would otherwise keep every parameter whole and test
nothing). The adapters (gathered) must agree to fp32 rounding. The trial-level run (Ray Train, checkpoints,
resume, export) is in tests/test_trial.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

ARCHS = ("mamba", "mamba2", "jamba")
METHODS = ("lora", "sdlora", "full")
STEPS = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_all(rank: int, port: int, model_dirs: dict[str, str], out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed
    from transformers import AutoModelForCausalLM

    import sdt
    from pipeline.config import parse_job
    from pipeline.train import gathered, make_engine

    deepspeed.init_distributed(dist_backend="gloo")
    for arch in ARCHS:
        for method in METHODS:
            for stage in (2, 3):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32)
                config = {"lora": sdt.SDTConfig.preset("lora", lora_targets=("in_proj", "out_proj")),
                          "sdlora": sdt.SDTConfig.preset("sdlora", channels_frozen=2, states_frozen=0.5,
                                                         inputs_frozen=0.5),
                          "full": sdt.SDTConfig.preset("full")}[method]  # fmt: skip
                # a fixed selection from fixed pseudo-updates: the training phase of sdlora
                updates = {p: {k: torch.linspace(-1, 1, v.numel()).reshape(v.shape) for k, v in u.items()}
                           for p, u in sdt.apply(AutoModelForCausalLM.from_pretrained(model_dirs[arch]),
                                                 config).warmup_updates().items()} if method == "sdlora" else None  # fmt: skip
                tuner = sdt.Tuner(model, config, selection=sdt.select(model, config, updates) if updates else None)
                spec = parse_job({
                    "name": "z", "model": {"builtin": "digits"},
                    "training": {"zero_stage": stage, "batch_size": 2, "lr": 1e-2,
                                 "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
                })  # fmt: skip
                engine = make_engine(tuner, spec, spec.training.lr, total_steps=100)
                generator = torch.Generator().manual_seed(100 + rank)
                for _ in range(STEPS):
                    tokens = torch.randint(1, 64, (2, 12), generator=generator)
                    engine.backward(engine(input_ids=tokens, labels=tokens).loss)
                    engine.step()
                names = [name for name, _ in tuner.named_trainable_parameters()]
                with gathered(engine, tuner.trainable_parameters()):
                    values = {f"{arch}/{method}/{stage}/{name}": p.detach().clone() for name, p in
                              tuner.named_trainable_parameters()}  # fmt: skip
                    partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
                assert len(values) == len(names)
                if rank == 0:
                    save_file(values, f"{out}/{arch}-{method}-{stage}.safetensors")
                    if stage == 3:
                        Path(f"{out}/{arch}-{method}-partitioned").write_text(str(partitioned))
                engine.destroy()


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    mp.start_processes(train_all, args=(free_port(), tiny_model_dirs, str(out)), nprocs=2, join=True, start_method="spawn")
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero3_trains_the_adapters_as_zero2_does(trained, arch, method):
    zero2 = load_file(trained / f"{arch}-{method}-2.safetensors")
    zero3 = load_file(trained / f"{arch}-{method}-3.safetensors")
    assert int((trained / f"{arch}-{method}-partitioned").read_text()) > 0  # ZeRO-3 really partitioned them
    assert [k.replace("/2/", "/") for k in zero2] == [k.replace("/3/", "/") for k in zero3]
    moved = 0
    for key, value in zero2.items():
        other = zero3[key.replace("/2/", "/3/")]
        torch.testing.assert_close(other, value, atol=2e-6, rtol=1e-5, msg=key)
        moved += int(torch.count_nonzero(value).item() > 0)
    assert moved == len(zero2)  # every adapter tensor trained (LoRA's B left zero, the deltas left zero)
