"""What one training step on the fused paths computes of the adapters (issue 35, item 3): each adapted weight is formed
once per step, not once per use, and LoRA on the projections never forms a weight at all (activation space).

On the CPU with the pure-PyTorch reference kernels; the CUDA kernels read the same tensors through the same Function.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from fused_reference import ReferenceKernels, ReferenceMamba2Kernels
from helpers import VOCAB, one_rank_process_group
from torch.nn.utils import parametrize

import sdt
from sdt import parametrize as P
from sdt.fused import install_fused_path

KERNELS = {"mamba": ReferenceKernels(), "mamba2": ReferenceMamba2Kernels()}
SDT_COUNTS = {"channels_frozen": 0.75, "states_frozen": 0.5, "warmup_steps": 1}


def adapter_classes() -> list[type]:
    """The parametrizations sdt attaches (adapters, and the views of a sparse group), each with its own forward."""
    modules = [c for c in vars(P).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    return [c for c in modules if "forward" in vars(c)]


@pytest.fixture
def formed(monkeypatch) -> Counter:
    """How often each adapter object formed its weight (its forward ran), by object."""
    counts: Counter = Counter()
    for cls in adapter_classes():
        original = vars(cls)["forward"]

        def counted(self, *args, _original=original, **kwargs):
            counts[id(self)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    return counts


def trained_tuner(model: torch.nn.Module, method: str) -> sdt.Tuner:
    """In its training phase, after one real warmup step (so that the selection ranks real updates)."""
    tuner = sdt.apply(model, sdt.SDTConfig.preset(method, **SDT_COUNTS))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p -= 0.1 * p.grad
    tuner.start_training(tuner.select())
    return tuner


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
@pytest.mark.parametrize("method", ["sdlora", "sdt"])
def test_a_fused_step_forms_each_adapted_weight_once(load_base, formed, arch, method):
    tuner = trained_tuner(load_base(arch), method)
    install_fused_path(tuner.model, kernels=KERNELS[arch])
    adapters = {
        id(adapter): f"{name}.{tensor}"
        for name, module in tuner.model.named_modules()
        if parametrize.is_parametrized(module)
        for tensor, adapters_of in module.parametrizations.items()
        for adapter in adapters_of
    }
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    tuner.model.zero_grad(set_to_none=True)
    formed.clear()
    tuner.model(input_ids=tokens, labels=tokens).loss.backward()
    assert formed, "no adapted weight was formed: the step trained nothing in weight space"
    twice = {adapters.get(key, key): count for key, count in formed.items() if count != 1}
    assert not twice, f"formed more than once in one step: {twice}"
    lora = [n for n, m in tuner.model.named_modules() if isinstance(m, P.LowRankDelta)]
    assert lora if method == "sdlora" else not lora
    assert not {id(m) for _, m in tuner.model.named_modules() if isinstance(m, P.LowRankDelta)} & set(formed)


# -- on the GPU -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mamba2", "jamba"])
def test_a_trial_step_builds_no_cache(monkeypatch, load_base, arch):
    """Mamba-2's and Jamba's configs say use_cache, and their models then build a cache in a training forward too,
    into which every mixer copies its conv input and final state; a trial's step hands its mixers none."""
    from pipeline.spec.job import parse_job
    from pipeline.trial.worker import make_engine, train_micro_batch
    from sdt.compat.transformers import mixer_cache

    model = load_base(arch)
    assert model.config.use_cache
    given = []
    for _, mixer in sdt.targets.mixers(model):
        mixer.register_forward_pre_hook(lambda _, args, kwargs: given.append(mixer_cache(kwargs)), with_kwargs=True)
    tuner = sdt.apply(model, sdt.SDTConfig.preset("lora", lora_targets=("out_proj",)))
    spec = parse_job({"name": "steps", "model": {"builtin": "digits"}, "training": {"zero_stage": 0, "batch_size": 2}})
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with one_rank_process_group(monkeypatch):
        engine = make_engine(tuner, spec, lr=1e-3, total_steps=2)
        train_micro_batch(engine, {"input_ids": tokens, "labels": tokens})
        engine.destroy()
    assert given == [None] * len(sdt.targets.mixers(model))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["grouped", "padded"])
def test_cuda_trial_steps_between_log_steps_never_wait_for_the_gpu(monkeypatch, layout):
    """A trial's steps (its batches copied ahead, forward, backward, the engine's optimizer step, the loss kept on
    the device) queue work without waiting for the GPU: a step that waits (a ``.item()``, a device-to-host copy, a
    synchronize) raises under CUDA's sync debug mode. Losses are read only every ``log_every_steps`` steps."""
    import deepspeed
    from processes import free_port
    from transformers import MambaConfig, MambaForCausalLM

    from pipeline.spec.job import parse_job
    from pipeline.tasks.formatting import Example
    from pipeline.trial.worker import Batches, LossLog, make_engine, train_micro_batch

    environment = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**environment, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)  # DeepSpeed's process group, as Ray Train sets it
    spec = parse_job({"name": "steps", "model": {"builtin": "digits"}, "method": {"name": "lora"},
                      "training": {"zero_stage": 0, "batch_size": 4, "log_every_steps": 100}})  # fmt: skip
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16)).cuda()
    tuner = sdt.apply(model, sdt.SDTConfig.preset("lora"))
    engine = make_engine(tuner, spec, lr=1e-3, total_steps=20)
    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(0, 256, (n,), generator=generator).tolist(), [7, 8], 0) for n in range(8, 72, 2)]
    batches = Batches(examples, batch_size=4, seed=0, rank=0, world=1, pad_id=0)
    batches.use(layout)
    losses = LossLog(torch.device("cuda"), log_every_steps=100)
    steps = batches.epoch(0, torch.device("cuda"))
    try:
        for number, (_, batch) in enumerate(steps):
            if number == 1:  # after a first step's allocations and kernel loading
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            loss, _ = train_micro_batch(engine, batch)
            losses.add(loss)
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        engine.destroy()
        # DeepSpeed's own teardown: it holds groups of the process group, which the next parametrisation's engine
        # would otherwise use after torch destroyed them ("Group ... is not registered").
        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
    assert number == batches.per_epoch - 1 == 7
    assert torch.isfinite(losses.report_sum) and losses.report_count == 8
