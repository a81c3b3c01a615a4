"""SDT's phases in TRL's SFTTrainer through sdt.integrations.trainer.train_sdt, on a tiny Mamba with a word-level
tokenizer over generated text (CPU, no network): warmup, selection, main run, the saved adapter reloads to the same
logits, and a run interrupted in its main run resumes to the uninterrupted run's logits. SFTConfig's defaults turn
gradient checkpointing on, so both phases run under it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import VOCAB, logits

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'sdtune[hf]')")
import datasets  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

import sdt  # noqa: E402
from sdt.integrations.trainer import WARMUP_DIR, train_sdt  # noqa: E402

CONFIG = sdt.SDTConfig(channels_frozen=0.75, states_frozen=0.5, lora_rank=2, lora_alpha=2.0, warmup_steps=3)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word ``w<i>`` is token i; the last two ids are end-of-sequence (also padding) and unknown."""
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<eos>": VOCAB - 2, "<unk>": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def texts(size: int = 16, length: int = 10) -> datasets.Dataset:
    tokens = torch.randint(0, VOCAB - 2, (size, length), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"text": [" ".join(f"w{t}" for t in row.tolist()) for row in tokens]})


def sft_trainer(load_base, output_dir: Path, callbacks=()) -> tuple[trl.SFTTrainer, sdt.Tuner]:
    tuner = sdt.apply(load_base("mamba"), CONFIG)
    args = trl.SFTConfig(  # fp32 (TRL's default is bf16 autocast), so that logits compare exactly
        output_dir=str(output_dir),
        max_length=16,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        bf16=False,
    )
    trainer = trl.SFTTrainer(
        model=tuner.model,
        args=args,
        train_dataset=texts(),
        processing_class=word_tokenizer(),
        callbacks=list(callbacks),
    )
    return trainer, tuner


class Interrupt(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4 and Path(args.output_dir).name != WARMUP_DIR:
            raise KeyboardInterrupt


def test_sft_trainer_runs_the_phases_saves_and_resumes(load_base, tmp_path):
    trainer, tuner = sft_trainer(load_base, tmp_path / "run")
    assert trainer.args.gradient_checkpointing
    output = train_sdt(trainer, tuner)
    assert tuner.phase == "train" and output.global_step == 8
    assert (tmp_path / "run" / WARMUP_DIR / "checkpoint-3").is_dir()
    trainer.save_model(str(tmp_path / "final"))
    expected = logits(tuner.model)
    assert torch.equal(logits(sdt.load(load_base("mamba"), tmp_path / "final").model), expected)

    trainer, tuner = sft_trainer(load_base, tmp_path / "interrupted", callbacks=[Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        train_sdt(trainer, tuner)
    trainer, tuner = sft_trainer(load_base, tmp_path / "interrupted")
    train_sdt(trainer, tuner, resume_from_checkpoint=True)
    torch.testing.assert_close(logits(tuner.model), expected, atol=1e-5, rtol=0)
