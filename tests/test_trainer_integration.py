"""SDT's phases in a Hugging Face Trainer (sdt.integrations.trainer.train_sdt) on a tiny Mamba, CPU, fp32.

Warmup then a restarted main run; what Trainer saves reloads with sdt.load to the same logits; a run interrupted in
the warmup, at its end or in the main run resumes from its Trainer checkpoint to the uninterrupted run's adapter and
logits; load_best_model_at_end loads the best adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, logits
from safetensors.torch import load_file

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'sdtune[hf]')")
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import sdt
from sdt.integrations.trainer import WARMUP_DIR, train_sdt

CONFIG = sdt.SDTConfig(channels_frozen=0.75, states_frozen=0.5, lora_rank=2, lora_alpha=2.0, warmup_steps=3)
STEPS_PER_EPOCH = 4  # 16 sequences, batch 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size: int = 16, length: int = 12, seed: int = 0) -> None:
        self.tokens = torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def sdt_trainer(load_base, output_dir: Path, callbacks=(), **overrides) -> tuple[Trainer, sdt.Tuner]:
    tuner = sdt.apply(load_base("mamba"), CONFIG)
    trainer = Trainer(
        model=tuner.model,
        args=arguments(output_dir, **overrides),
        train_dataset=Tokens(),
        eval_dataset=Tokens(size=8, seed=1),
        callbacks=list(callbacks),
    )
    return trainer, tuner


def adapter_of(tuner: sdt.Tuner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sdt.adapter_tensors(tuner).items()}


def phase_in(checkpoint: Path) -> str:
    return json.loads((checkpoint / "adapter_config.json").read_text())["phase"]


def test_warmup_select_and_a_restarted_main_run(load_base, tmp_path):
    trainer, tuner = sdt_trainer(load_base, tmp_path / "run")
    output = train_sdt(trainer, tuner)

    total = 2 * STEPS_PER_EPOCH
    assert tuner.phase == "train" and output.global_step == total  # the main run is the whole run, from step 0
    warmup = tmp_path / "run" / WARMUP_DIR
    assert sorted(p.name for p in warmup.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # every 2 steps, and its end
    assert phase_in(warmup / "checkpoint-3") == "warmup"
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert phase_in(tmp_path / "run" / "checkpoint-8") == "train"
    # the selection comes from the warmup's last checkpoint
    warmed = sdt.load(load_base("mamba"), warmup / "checkpoint-3")
    assert warmed.phase == "warmup"
    for prefix, selected in warmed.select().items():
        assert all(torch.equal(v, tuner.selection[prefix][k]) for k, v in selected.items())
    # a fresh optimizer over the training phase's adapters, and a fresh LR schedule
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in tuner.trainable_parameters()}
    assert trainer.state.log_history[0]["learning_rate"] == pytest.approx(1e-2)

    # what Trainer saves reloads with one call to the same logits; a plain from_pretrained refuses it
    trainer.save_model(str(tmp_path / "final"))
    reloaded = sdt.load(load_base("mamba"), tmp_path / "final")
    assert torch.equal(logits(reloaded.model), logits(tuner.model))
    with pytest.raises(ValueError, match=r"sdt\.load"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    sdt.save_merged(tuner, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(tuner.model), atol=1e-5, rtol=0)


class Interrupt(TrainerCallback):
    """Stops the process (an exception) right after the checkpoint of ``step`` in ``phase`` was written."""

    def __init__(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def on_save(self, args, state, control, **kwargs):
        in_warmup = Path(args.output_dir).name == WARMUP_DIR
        if state.global_step == self.step and in_warmup == (self.phase == "warmup"):
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dirs, tmp_path_factory) -> dict:
    def load_base(arch):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)

    trainer, tuner = sdt_trainer(load_base, tmp_path_factory.mktemp("uninterrupted"))
    train_sdt(trainer, tuner)
    return {"adapter": adapter_of(tuner), "logits": logits(tuner.model)}


@pytest.mark.parametrize(
    ("phase", "step"), [("warmup", 2), ("warmup", 3), ("train", 4)], ids=["in-warmup", "warmup-done", "in-main-run"]
)
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(phase, step, uninterrupted, load_base, tmp_path):
    trainer, tuner = sdt_trainer(load_base, tmp_path, callbacks=[Interrupt(phase, step)])
    with pytest.raises(KeyboardInterrupt):
        train_sdt(trainer, tuner)

    trainer, tuner = sdt_trainer(load_base, tmp_path)  # a new process: fresh base, tuner and trainer
    output = train_sdt(trainer, tuner, resume_from_checkpoint=True)
    assert output.global_step == 2 * STEPS_PER_EPOCH
    resumed = adapter_of(tuner)
    assert resumed.keys() == uninterrupted["adapter"].keys()
    for name, value in uninterrupted["adapter"].items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(tuner.model), uninterrupted["logits"], atol=1e-5, rtol=0)


def test_load_best_model_at_end_loads_the_best_adapter_and_warmup_is_not_evaluated(load_base, tmp_path):
    trainer, tuner = sdt_trainer(
        load_base,
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    train_sdt(trainer, tuner)
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path
    stored = load_file(best / "adapter_model.safetensors")
    assert all(torch.equal(value, stored[name]) for name, value in sdt.adapter_tensors(tuner).items())
    warmup_state = json.loads((tmp_path / WARMUP_DIR / "checkpoint-3" / "trainer_state.json").read_text())
    assert not any("eval_loss" in entry for entry in warmup_state["log_history"])
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


def test_an_optimizer_passed_in_is_refused(load_base, tmp_path):
    tuner = sdt.apply(load_base("mamba"), CONFIG)
    optimizer = torch.optim.AdamW(tuner.trainable_parameters())
    trainer = Trainer(
        model=tuner.model,
        args=arguments(tmp_path),
        train_dataset=Tokens(),
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)),
    )
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        train_sdt(trainer, tuner)


def test_a_warmup_longer_than_the_run_is_refused(load_base, tmp_path):
    trainer, tuner = sdt_trainer(load_base, tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="SDT's 3 warmup steps do not fit in the run's 2 optimizer steps"):
        train_sdt(trainer, tuner)


def test_sdt_itself_imports_no_trainer_stack():
    """Trainer, accelerate and TRL are the optional 'hf' extra: only sdt.integrations.trainer imports them."""
    stack = ("trl", "accelerate", "transformers.trainer")
    code = f"import sys, sdt; print(sorted(m for m in {stack!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_full_fine_tuning_saves_and_resumes_as_a_plain_model(load_base, tmp_path):
    """The full method has no adapter: Trainer's own saving and loading, a checkpoint that from_pretrained reads."""

    def full_run(output_dir: Path, callbacks=(), resume: bool = False) -> sdt.Tuner:
        tuner = sdt.apply(load_base("mamba"), sdt.SDTConfig.preset("full"))
        args = arguments(output_dir, max_steps=4)
        trainer = Trainer(model=tuner.model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))
        train_sdt(trainer, tuner, resume_from_checkpoint=resume)
        return tuner

    expected = logits(full_run(tmp_path / "whole").model)
    with pytest.raises(KeyboardInterrupt):
        full_run(tmp_path / "interrupted", callbacks=[Interrupt("train", 2)])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "interrupted" / "checkpoint-2", dtype=torch.float32)
    assert not torch.equal(logits(plain), logits(load_base("mamba")))  # a trained plain model
    resumed = full_run(tmp_path / "interrupted", resume=True)
    torch.testing.assert_close(logits(resumed.model), expected, atol=1e-5, rtol=0)
