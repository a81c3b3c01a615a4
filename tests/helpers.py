"""Shared test helpers: token batches, a minimal training loop over the SDT phases, a process group of one rank."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from processes import free_port
from transformers import JambaConfig, Mamba2Config

import sdt

VOCAB = 64

# Jamba's layer kinds in four layers: attention at layer 1 (Mamba at 0, 2, 3), a two-expert MoE on layers 1 and 3.
JAMBA_LAYOUT = {
    "num_hidden_layers": 4,
    "attn_layer_period": 4,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "num_experts": 2,
}


def kernel_mamba2_config(vocab: int) -> Mamba2Config:
    """A Mamba-2 the CUDA kernels take (head_dim 64, state 64; chunks of 64 tokens), two groups of four heads."""
    return Mamba2Config(vocab_size=vocab, hidden_size=256, num_hidden_layers=2, state_size=64, num_heads=8,
                        head_dim=64, n_groups=2, expand=2, chunk_size=64)  # fmt: skip


def kernel_jamba_config(vocab: int) -> JambaConfig:
    """A Jamba the CUDA kernels take, with each of its layer kinds (:data:`JAMBA_LAYOUT`)."""
    return JambaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, mamba_d_state=16, **JAMBA_LAYOUT)  # fmt: skip


def random_tokens(batch: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(tuner: sdt.Tuner, steps: int, lr: float = 1e-2, seed: int = 0, check_first: bool = True) -> float:
    """``steps`` AdamW steps of next-token loss on random tokens; returns the last loss."""
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=lr, weight_decay=0.0)
    tuner.model.train()
    for step in range(steps):
        tokens = random_tokens(seed=seed + step)
        loss = tuner.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if check_first and step == 0:
            tuner.check_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def warmup_select_train(tuner: sdt.Tuner, warmup_steps: int = 3, train_steps: int = 3) -> dict:
    """The SDT phases as a trainer runs them; returns the selection."""
    train(tuner, warmup_steps, seed=100)
    selection = tuner.select()
    tuner.start_training(selection)
    train(tuner, train_steps, seed=200)
    return selection


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    return model(input_ids=random_tokens(seed=7) if tokens is None else tokens).logits


def changed_entries(before: dict, after: dict) -> dict[str, torch.Tensor]:
    """Per tensor name, the flat positions where ``after`` differs bitwise from ``before``."""
    out = {}
    for name, value in before.items():
        diff = (after[name].to(value.device) != value).reshape(-1).nonzero().flatten().cpu()
        if diff.numel():
            out[name] = diff
    return out


def assert_mamba1_invariants(base: dict, merged: dict, selection: dict, layers: list, exact_columns: bool = True):
    """Only the selected A_log entries, the selected channels' B/C columns of x_proj and out_proj (LoRA) moved.

    ``exact_columns``: every selected column changed somewhere (in bf16 a tiny update may round back to W0).
    """
    diffs = changed_entries(base, merged)
    allowed = {f"{p}.{t}" for p, _ in layers for t in ("A_log", "x_proj.weight", "out_proj.weight")}
    assert set(diffs) <= allowed, f"entries outside the selection changed: {set(diffs) - allowed}"
    for prefix, mixer in layers:
        channels, states = mixer.A_log.shape
        dt_rank = mixer.x_proj.weight.shape[0] - 2 * states
        sel = {k: v.cpu() for k, v in selection[prefix].items()}
        a_changed = {(int(i) // states, int(i) % states) for i in diffs[f"{prefix}.A_log"]}
        a_selected = {(int(c), int(s)) for c, row in zip(sel["channels"], sel["states"]) for s in row}
        assert a_changed == a_selected, prefix
        x_changed = {(int(i) // channels, int(i) % channels) for i in diffs[f"{prefix}.x_proj.weight"]}
        assert all(dt_rank <= row < dt_rank + 2 * states for row, _ in x_changed), "dt rows of x_proj moved"
        columns = {col for _, col in x_changed}
        selected_columns = {int(c) for c in sel["channels"]}
        assert columns == selected_columns if exact_columns else columns <= selected_columns, prefix


def assert_mamba2_invariants(base: dict, merged: dict, selection: dict, layers: list, exact_rows: bool = True):
    """Only the selected heads' A_log, the selected (row, input) entries of in_proj's B/C blocks and out_proj moved."""
    diffs = changed_entries(base, merged)
    allowed = {f"{p}.{t}" for p, _ in layers for t in ("A_log", "in_proj.weight", "out_proj.weight")}
    assert set(diffs) <= allowed, f"entries outside the selection changed: {set(diffs) - allowed}"
    for prefix, mixer in layers:
        groups, states = mixer.n_groups, mixer.ssm_state_size
        inner, hidden = mixer.intermediate_size, mixer.in_proj.weight.shape[1]
        sel = {k: v.cpu() for k, v in selection[prefix].items()}
        assert {int(i) for i in diffs[f"{prefix}.A_log"]} == {int(h) for h in sel["channels"]}, prefix
        in_changed = {(int(i) // hidden, int(i) % hidden) for i in diffs[f"{prefix}.in_proj.weight"]}
        expected = set()
        for g_pos, g in enumerate(sel["groups"].tolist()):
            for s_pos, n in enumerate(sel["states"][g_pos].tolist()):
                for d in sel["inputs"][g_pos, s_pos].tolist():
                    expected.add((2 * inner + g * states + n, d))  # B row
                    expected.add((2 * inner + groups * states + g * states + n, d))  # C row
        assert in_changed == expected if exact_rows else in_changed <= expected, prefix


@contextmanager
def one_rank_process_group(monkeypatch) -> Iterator[None]:
    """A gloo process group of one rank in this process, as Ray Train gives the worker of a one-worker trial (with
    the launcher's variables DeepSpeed reads)."""
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        # An engine made inside leaves DeepSpeed holding groups of this process group, which a later engine in this
        # process would use after they are destroyed: DeepSpeed's own teardown releases them with the group.
        deepspeed = sys.modules.get("deepspeed")
        if deepspeed is not None and deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        else:
            torch.distributed.destroy_process_group()
