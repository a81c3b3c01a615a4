"""Fine-tune a Mamba with SDLoRA in plain PyTorch: warmup, select, train, save, load, merge.

    python examples/train_plain.py                          # a tiny Mamba built here: seconds on a CPU
    python examples/train_plain.py --model state-spaces/mamba-130m-hf --vocab 50280 --hidden 0 \\
        --warmup-steps 500 --steps 5000 --channels-frozen 0.99 --states-frozen 0.75   # the paper's SDLoRA

The task is generated here, so the script needs no download: every sequence counts up from a random token with
its own stride (mod the vocabulary), and the model learns to continue it. Put your own batches in `batch()`.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import sdt

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="a Mamba, Mamba-2 or Jamba to load (default: build a tiny Mamba)")
parser.add_argument("--vocab", type=int, default=64, help="tokens the task draws from (at most the model's)")
parser.add_argument("--hidden", type=int, default=32, help="the tiny Mamba's width")
parser.add_argument("--layers", type=int, default=2, help="the tiny Mamba's depth")
parser.add_argument("--warmup-steps", type=int, default=20, help="SDT's warmup, in optimizer steps")
parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the main run")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--length", type=int, default=24)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--channels-frozen", type=float, default=0.75, help="fraction of channels SDT leaves alone")
parser.add_argument("--states-frozen", type=float, default=0.5, help="fraction of each channel's states left alone")
parser.add_argument("--out", default="out/train_plain")
args = parser.parse_args()
out = Path(args.out)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

# The base model, loaded the way you load yours. The default tiny Mamba is saved first so that it can be.
if args.model is None:
    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16)
    MambaForCausalLM(config).save_pretrained(out / "base")
    args.model = str(out / "base")


def load_base() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)


def batch(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=generator)
    stride = torch.randint(1, 5, (args.batch, 1), generator=generator)
    return ((start + stride * torch.arange(args.length)) % args.vocab).to(device)


@torch.no_grad()
def eval_loss(model: torch.nn.Module) -> float:
    model.eval()
    tokens = batch(seed=-1)  # never trained on
    return model(input_ids=tokens, labels=tokens).loss.item()


def train(tuner: sdt.Tuner, steps: int, planned: int, first_seed: int) -> None:
    """``steps`` AdamW steps, with a fresh optimizer and a linear decay planned over ``planned`` steps."""
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / planned)
    tuner.model.train()
    for step in range(steps):
        tokens = batch(first_seed + step)
        loss = tuner.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if step == 0:
            tuner.check_gradients()  # every adapter tensor gets a gradient (no kernel bypasses one)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            print(f"{tuner.phase} step {step:4d}  loss {loss.item():.4f}")


model = load_base()
base_loss = eval_loss(model)
config = sdt.SDTConfig.preset(
    "sdlora", channels_frozen=args.channels_frozen, states_frozen=args.states_frozen, warmup_steps=args.warmup_steps
)
tuner = sdt.apply(model, config)  # warmup phase: a dense delta on A_log, LoRA on out_proj

# 1. Warmup: its updates rank the channels and states. The official code plans its LR schedule over the whole run.
train(tuner, args.warmup_steps, planned=args.steps, first_seed=0)
# 2. Select, then restart: base weights back, fresh LoRA, sparse deltas at the selection; a new optimizer below.
tuner.start_training(tuner.select())
print(f"training {tuner.num_trainable_parameters():,} parameters: {config.describe()}")
# 3. Train, from step 0 with a fresh optimizer and schedule (the official code restarts from scratch).
train(tuner, args.steps, planned=args.steps, first_seed=0)
tuned_loss = eval_loss(tuner.model)

# 4. Save the adapter (kilobytes: tensors and selection), load it into a fresh base, merge it into a plain model.
sdt.save(tuner, out / "adapter")
reloaded = sdt.load(load_base(), out / "adapter")
tokens = batch(seed=-1)
with torch.no_grad():
    expected = tuner.model(input_ids=tokens).logits
    assert torch.equal(reloaded.model.eval()(input_ids=tokens).logits, expected), "the reloaded adapter differs"
    reloaded.merge().save_pretrained(out / "merged")  # a plain transformers model: no sdt needed to use it
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).to(device).eval()
    difference = (merged(input_ids=tokens).logits - expected).abs().max().item()
print(f"adapter in {out / 'adapter'}, merged model in {out / 'merged'} (max logit difference {difference:.1e})")
print(f"eval loss: base {base_loss:.4f} -> sdlora {tuned_loss:.4f}")
