"""Shared test helpers: token batches and a minimal training loop over the SDT phases."""

from __future__ import annotations

import torch

import sdt

VOCAB = 64


def random_tokens(batch: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(tuner: sdt.Tuner, steps: int, lr: float = 1e-2, seed: int = 0, check_first: bool = True) -> float:
    """``steps`` AdamW steps of next-token loss on random tokens; returns the last loss."""
    optimizer = torch.optim.AdamW([p for _, p in tuner.trainable_parameters()], lr=lr, weight_decay=0.0)
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
