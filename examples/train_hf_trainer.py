"""Fine-tune a Mamba with SDLoRA in a Hugging Face Trainer (TRL's SFTTrainer takes the same two lines).

    pip install 'sdtune[hf]'                                  # transformers' Trainer needs accelerate
    python examples/train_hf_trainer.py                       # a tiny Mamba built here: seconds on a CPU
    python examples/train_hf_trainer.py --resume              # after an interruption: from the newest checkpoint

``train_sdt(trainer, tuner)`` replaces ``trainer.train()``: SDT's warmup, the selection, then the main run with a
fresh optimizer and LR schedule. ``trainer.save_model`` writes the adapter, which ``sdt.load`` puts on a fresh base.
The task is generated here (sequences counting up from a random token with their own stride), so nothing downloads.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM, Trainer, TrainingArguments

import sdt
from sdt.integrations.trainer import train_sdt

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="a Mamba, Mamba-2 or Jamba to load (default: build a tiny Mamba)")
parser.add_argument("--vocab", type=int, default=64, help="tokens the task draws from (at most the model's)")
parser.add_argument("--hidden", type=int, default=32, help="the tiny Mamba's width")
parser.add_argument("--layers", type=int, default=2, help="the tiny Mamba's depth")
parser.add_argument("--warmup-steps", type=int, default=20, help="SDT's warmup, in optimizer steps")
parser.add_argument("--examples", type=int, default=640, help="training sequences")
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--length", type=int, default=24)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--channels-frozen", type=float, default=0.75, help="fraction of channels SDT leaves alone")
parser.add_argument("--states-frozen", type=float, default=0.5, help="fraction of each channel's states left alone")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--out", default="out/train_hf_trainer")
args = parser.parse_args()
out = Path(args.out)
torch.manual_seed(0)

if args.model is None:  # the tiny Mamba, saved so that it loads like any other
    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16)
    MambaForCausalLM(config).save_pretrained(out / "base")
    args.model = str(out / "base")


class StrideSequences(torch.utils.data.Dataset):
    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, args.vocab, (size, 1), generator=generator)
        stride = torch.randint(1, 5, (size, 1), generator=generator)
        self.tokens = (start + stride * torch.arange(args.length)) % args.vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def load_base() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)


config = sdt.SDTConfig.preset(
    "sdlora", channels_frozen=args.channels_frozen, states_frozen=args.states_frozen, warmup_steps=args.warmup_steps
)
tuner = sdt.apply(load_base(), config)
training_args = TrainingArguments(
    output_dir=str(out / "run"),
    per_device_train_batch_size=args.batch,
    num_train_epochs=args.epochs,
    learning_rate=args.lr,
    lr_scheduler_type="linear",
    weight_decay=0.0,
    logging_steps=10,
    save_steps=20,
    eval_strategy="epoch",
    report_to=[],
    disable_tqdm=True,
)
trainer = Trainer(
    model=tuner.model,
    args=training_args,
    train_dataset=StrideSequences(args.examples, seed=0),
    eval_dataset=StrideSequences(64, seed=1),
)
base_loss = trainer.evaluate()["eval_loss"]
train_sdt(trainer, tuner, resume_from_checkpoint=args.resume)  # warmup, select, restart, train
tuned_loss = trainer.evaluate()["eval_loss"]

trainer.save_model(str(out / "adapter"))  # the adapter; a Trainer checkpoint-N holds one too
device = tuner.model.device  # where the Trainer put it
reloaded = sdt.load(load_base().to(device), out / "adapter")
sdt.save_merged(reloaded, out / "merged")  # a plain transformers model: no sdt needed to use it
merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).to(device)
tokens = StrideSequences(4, seed=2).tokens.to(device)
with torch.no_grad():
    expected = tuner.model.eval()(input_ids=tokens).logits
    assert torch.equal(reloaded.model.eval()(input_ids=tokens).logits, expected), "the reloaded adapter differs"
    difference = (merged.eval()(input_ids=tokens).logits - expected).abs().max().item()
print(f"adapter in {out / 'adapter'}, merged model in {out / 'merged'} (max logit difference {difference:.1e})")
print(f"eval loss: base {base_loss:.4f} -> sdlora {tuned_loss:.4f}")
