"""SDLoRA learns: a Mamba analogue of the spec's teacher-student check (7.3, point 5).

The "pretrained" base is a random tiny Mamba; the teacher is that base with a few channels' SSM parameters
(A_log and their B/C columns) changed and a low-rank change to out_proj. The student starts from the base and must
match the teacher's next-token distribution. SDT has to find the changed channels from its warmup alone.
"""

import torch
import torch.nn.functional as F
from transformers import MambaConfig, MambaForCausalLM

import sdt

VOCAB, HIDDEN, LAYERS, STATES = 32, 32, 2, 8


def build_pair():
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=STATES)
    base = MambaForCausalLM(config)
    teacher = MambaForCausalLM(config)
    teacher.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mixer in (layer.mixer for layer in teacher.backbone.layers):
            channels = torch.randperm(mixer.A_log.shape[0], generator=generator)[:4]
            mixer.A_log[channels] -= 2.0  # slower decay: longer memory on those channels
            dt_rank = mixer.x_proj.weight.shape[0] - 2 * STATES
            mixer.x_proj.weight[dt_rank:, channels] += 0.5 * torch.randn(2 * STATES, 4, generator=generator)
            out_features, in_features = mixer.out_proj.weight.shape
            low_rank = torch.randn(out_features, 2, generator=generator) @ torch.randn(
                2, in_features, generator=generator
            )
            mixer.out_proj.weight += 0.05 * low_rank
    return base.eval(), teacher.eval()


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


def test_sdlora_learns_the_teacher():
    student, teacher = build_pair()
    eval_tokens = next(batches(seed=999))
    with torch.no_grad():
        frozen_loss = distillation_loss(student, teacher, eval_tokens).item()

    config = sdt.SDTConfig(channels_frozen=56, states_frozen=4, warmup_steps=30, lora_rank=4, lora_alpha=4)
    tuner = sdt.apply(student, config)
    data = batches(seed=0)
    run_phase(tuner, teacher, config.warmup_steps, lr=1e-2, data=data)
    tuner.start_training(tuner.select())
    run_phase(tuner, teacher, 250, lr=1e-2, data=data)

    with torch.no_grad():
        tuned_loss = distillation_loss(tuner.model, teacher, eval_tokens).item()
    assert tuned_loss < 0.1 * frozen_loss, (frozen_loss, tuned_loss)
    deltas = {n: p for n, p in tuner.named_trainable_parameters() if n.endswith(".delta")}
    assert set(deltas) == {"sdt_sparse.A_log.delta", "sdt_sparse.x_proj_weight.delta"}
    assert all(torch.count_nonzero(p) == p.numel() for p in deltas.values())
