"""SDLoRA finds what changed and learns it: a Mamba analogue of the paper's teacher-student check
(docs/paper-reproduction.md, part 2).

The "pretrained" base is a random tiny Mamba whose mixers output their scan alone (D = 0), loud enough to matter
against the residual stream (out_proj × 10): in a random Mamba as initialised the SSM barely reaches the logits, so
no warmup could see a change to it (its updates would rank noise). The teacher is the base with
the A_log of 4 channels per layer raised by 2 on 4 of each one's 8 states (faster decay), and a low-rank change to
out_proj. SDLoRA (8 of 64 channels, 4 of 8 states per channel, LoRA on out_proj) starts from the base and must match
the teacher's next-token distribution; which channels and states to train, its warmup alone must find.
"""

import copy

import torch
import torch.nn.functional as F
from transformers import MambaConfig, MambaForCausalLM

import sdt

VOCAB, HIDDEN, LAYERS, STATES = 32, 32, 2, 8
CHANGED_CHANNELS, CHANGED_STATES = 4, 4
CONFIG = sdt.SDTConfig(channels_frozen=56, states_frozen=4, warmup_steps=30, lora_rank=4, lora_alpha=4)
TRAIN_STEPS = 250


def build_pair() -> tuple[MambaForCausalLM, MambaForCausalLM, list[dict[int, set[int]]]]:
    """(base, teacher, per layer: each changed channel -> its changed states)."""
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=STATES, time_step_min=0.01
    )
    base = MambaForCausalLM(config)
    with torch.no_grad():
        for layer in base.backbone.layers:
            layer.mixer.out_proj.weight.mul_(10.0)
            layer.mixer.D.zero_()
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    changed = []
    with torch.no_grad():
        for mixer in (layer.mixer for layer in teacher.backbone.layers):
            channels = torch.randperm(mixer.A_log.shape[0], generator=generator)[:CHANGED_CHANNELS].tolist()
            states = {c: torch.randperm(STATES, generator=generator)[:CHANGED_STATES].tolist() for c in channels}
            for channel, picked in states.items():
                mixer.A_log[channel, picked] += 2.0
            changed.append({channel: set(picked) for channel, picked in states.items()})
            out_features, in_features = mixer.out_proj.weight.shape
            low_rank = torch.randn(out_features, 2, generator=generator) @ torch.randn(
                2, in_features, generator=generator
            )
            mixer.out_proj.weight += 0.05 * low_rank
    return base.eval(), teacher.eval(), changed


def batches(seed):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (16, 24), generator=generator)


def distillation_loss(student, teacher, tokens):
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=tokens).logits, dim=-1)
    prediction = F.log_softmax(student(input_ids=tokens).logits, dim=-1)
    return F.kl_div(prediction, target, log_target=True, reduction="batchmean")


def run_phase(tuner, teacher, steps, lr, data):
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = distillation_loss(tuner.model, teacher, next(data))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def least_updated(updates: dict[str, dict[str, torch.Tensor]], like: dict[str, dict[str, torch.Tensor]]):
    """The selection SDT would make if it ranked backwards (as many entries as ``like``): per layer the channels the
    warmup updated least, and their least-updated states."""
    selection = {}
    for prefix, update in updates.items():
        k_channels, k_states = like[prefix]["states"].shape
        squares = update["A_log"].pow(2)
        channels = torch.argsort(squares.sum(dim=1), stable=True)[:k_channels]
        selection[prefix] = {"channels": channels, "states": torch.argsort(squares[channels], dim=1)[:, :k_states]}
    return selection


def test_the_warmup_finds_the_changed_channels_and_states_and_sdlora_learns_the_teacher():
    base, teacher, changed = build_pair()
    untouched = copy.deepcopy(base)
    eval_tokens = next(batches(seed=999))
    with torch.no_grad():
        frozen_loss = distillation_loss(base, teacher, eval_tokens).item()

    tuner = sdt.apply(base, CONFIG)
    run_phase(tuner, teacher, CONFIG.warmup_steps, lr=1e-2, data=batches(seed=0))
    updates = tuner.warmup_updates()
    selection = tuner.select()

    found_channels, found_states = 0, 0
    for picked, truth in zip(selection.values(), changed):
        channels = picked["channels"].tolist()
        found = [channel for channel in truth if channel in channels]
        found_channels += len(found)
        found_states += sum(len(set(picked["states"][channels.index(c)].tolist()) & truth[c]) for c in found)
    # Found here: 7 of the 8 changed channels, and 27 of those channels' 28 changed states. A random choice of 8 of
    # a layer's 64 channels would hold 1 of the 8 on average (6 or more: probability below 1e-4), and a random
    # choice of 4 of a channel's 8 states half of its changed ones.
    assert found_channels >= 6, (selection, changed)
    assert found_states >= 0.8 * CHANGED_STATES * found_channels, (found_states, found_channels)

    tuner.start_training(selection)
    run_phase(tuner, teacher, TRAIN_STEPS, lr=1e-2, data=batches(seed=1))
    backwards = sdt.Tuner(untouched, CONFIG, selection=least_updated(updates, selection))
    run_phase(backwards, teacher, TRAIN_STEPS, lr=1e-2, data=batches(seed=1))
    with torch.no_grad():
        tuned_loss = distillation_loss(tuner.model, teacher, eval_tokens).item()
        backwards_loss = distillation_loss(backwards.model, teacher, eval_tokens).item()
    # Measured: 0.04 of the frozen loss, and 0.40 with the same budget on the channels the warmup ranked last (10x
    # the tuned loss): what the selection picks is what is learned.
    assert tuned_loss < 0.1 * frozen_loss, (frozen_loss, tuned_loss)
    assert backwards_loss > 3 * tuned_loss, (tuned_loss, backwards_loss)
    deltas = {n: p for n, p in tuner.named_trainable_parameters() if n.endswith(".delta")}
    assert set(deltas) == {"sdt_sparse.A_log.delta", "sdt_sparse.x_proj_weight.delta"}
    assert all(torch.count_nonzero(p) == p.numel() for p in deltas.values())
