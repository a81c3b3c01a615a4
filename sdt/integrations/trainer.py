"""SDT's phases in a Hugging Face ``transformers.Trainer``, or any subclass of it (TRL's ``SFTTrainer``, ...)::

    import sdt
    from sdt.integrations.trainer import train_sdt

    tuner = sdt.apply(model, sdt.SDTConfig.preset("sdlora"))
    trainer = Trainer(model=tuner.model, args=TrainingArguments(...), train_dataset=...)   # or SFTTrainer(...)
    train_sdt(trainer, tuner)          # instead of trainer.train(); resume_from_checkpoint=True resumes
    trainer.save_model("out")          # the adapter: sdt.load(AutoModelForCausalLM.from_pretrained(base), "out")

:func:`train_sdt` runs the phases as the official code does (docs/method.md §2):

1. **Warmup**: ``trainer.train()`` for ``tuner.config.warmup_steps`` optimizer steps (SDT's warmup, not the LR warmup
   of ``TrainingArguments.warmup_steps``), with the run's own optimizer and LR schedule, planned over the whole run.
   Nothing is evaluated (a warmup adapter is thrown away). Its checkpoints go to ``<output_dir>/sdt-warmup/``, and its
   last step is always saved when the run saves at all, so that a resume after it starts from its result.
2. **Select and restart**: ``tuner.select()``, ``tuner.start_training(...)`` (base weights back, fresh LoRA, sparse
   deltas), and the trainer's optimizer, LR schedule and step counter start again, as a fresh Trainer's would.
3. **Train**: ``trainer.train()`` for the whole run the arguments describe, checkpoints in ``output_dir``.

The coverage guard (:meth:`sdt.Tuner.check_gradients`) runs at the first optimizer step of each phase.

Checkpoints hold the adapter, because ``model.save_pretrained`` of a tuned model writes it. Trainer reads model weights
back in two places, resuming (``_load_from_checkpoint``) and ``load_best_model_at_end`` (``_load_best_model``), and
knows PEFT's adapters there but not sdt's; while :func:`train_sdt` runs, both go through :func:`sdt.io.restore`
(:mod:`sdt.compat.transformers`: instance attributes of the trainer, removed afterwards; a full fine-tuning
checkpoint still loads Trainer's way).

Limits: the optimizer must be one the Trainer builds (``args.optim`` or ``optimizer_cls_and_kwargs``); one passed in
``optimizers=`` holds the warmup's parameters and cannot follow the restart. DeepSpeed and FSDP through the Trainer
are untested; ZeRO-3 and FSDP shard the dense warmup updates that the selection ranks, so they cannot work.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import SaveStrategy, TrainOutput, get_last_checkpoint

from ..compat.transformers import checkpoint_loaders, checkpoint_loaders_replaced
from ..io import CONFIG_NAME, read_config, restore
from ..model import Tuner

logger = logging.getLogger(__name__)

WARMUP_DIR = "sdt-warmup"  # under output_dir: the warmup's checkpoints, apart from the main run's checkpoint-N
TRAINER_STATE_NAME = "trainer_state.json"


class PhaseCallback(TrainerCallback):
    """One phase's rules: the coverage guard at its first optimizer step; for the warmup, the stop after
    ``warmup_steps`` optimizer steps (saved when the run saves at all) and no evaluation."""

    def __init__(self, tuner: Tuner, check_gradients: bool, warmup_steps: int | None = None) -> None:
        self.tuner, self.check_gradients, self.warmup_steps = tuner, check_gradients, warmup_steps
        self.checked = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.warmup_steps is not None and state.max_steps < self.warmup_steps:
            raise ValueError(
                f"warmup_steps: SDT's {self.warmup_steps} warmup steps do not fit in the run's {state.max_steps} "
                "optimizer steps; lower SDTConfig.warmup_steps or train longer"
            )

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.check_gradients and not self.checked:
            self.tuner.check_gradients()
            self.checked = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.warmup_steps is not None:
            control.should_evaluate = False
            if state.global_step >= self.warmup_steps:
                control.should_training_stop = True
                control.should_save = args.save_strategy != SaveStrategy.NO
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.warmup_steps is not None:
            control.should_evaluate = False
            if state.global_step >= self.warmup_steps:
                control.should_save = False  # the warmup's last step saved it already
        return control


def train_sdt(
    trainer: Trainer, tuner: Tuner, resume_from_checkpoint: str | os.PathLike | bool | None = None
) -> TrainOutput:
    """Run ``tuner``'s phases in ``trainer`` (whose model is ``tuner.model``); returns the main run's TrainOutput.

    ``resume_from_checkpoint`` as for ``Trainer.train``: ``True`` takes the newest checkpoint of the main run, or
    else of the warmup; a path, that checkpoint. A main-run checkpoint resumes the main run (the adapter in it holds
    the selection), a warmup checkpoint the warmup; either ends where the uninterrupted run would have.
    """
    if trainer.accelerator.unwrap_model(trainer.model) is not tuner.model:
        raise ValueError("train_sdt: the trainer must train tuner.model (Trainer(model=tuner.model, ...))")
    if trainer.optimizer is not None or trainer.lr_scheduler is not None:
        raise ValueError(
            "train_sdt: the warmup and the main run each need a fresh optimizer over their own adapters; let the "
            "Trainer build it (TrainingArguments.optim, or Trainer(optimizer_cls_and_kwargs=...)) instead of "
            "passing optimizers=(...)"
        )
    checkpoint = find_checkpoint(trainer.args.output_dir, resume_from_checkpoint)
    check_gradients = not trainer.is_deepspeed_enabled  # DeepSpeed keeps gradients where p.grad does not show them
    with adapter_checkpoints(trainer, tuner):
        if tuner.phase == "warmup":
            if checkpoint is None or phase_of(checkpoint) != "train":
                warm_up(trainer, tuner, checkpoint, check_gradients)
                tuner.start_training(tuner.select())
                logger.info("sdt: warmup done, selection made; the main run starts with a fresh optimizer")
                restart(trainer)
                checkpoint = None
        if checkpoint is not None and phase_of(checkpoint) is not None:
            # the adapter's shape (phase, selection) before the trainer builds an optimizer over it
            restore(tuner, checkpoint)
        with phase_callback(trainer, PhaseCallback(tuner, check_gradients)):
            return trainer.train(resume_from_checkpoint=checkpoint)


def warm_up(trainer: Trainer, tuner: Tuner, checkpoint: str | None, check_gradients: bool) -> None:
    """The warmup phase: ``trainer.train()`` into ``<output_dir>/sdt-warmup`` until ``warmup_steps``, from
    ``checkpoint`` if given; a checkpoint at the last warmup step already holds the result."""
    steps = tuner.config.warmup_steps
    if checkpoint is not None:
        restore(tuner, checkpoint)
        if checkpoint_step(checkpoint) >= steps:
            return
    args = trainer.args
    output_dir = args.output_dir
    args.output_dir = str(Path(output_dir) / WARMUP_DIR)
    logger.info("sdt: warmup for %d optimizer steps, checkpoints in %s", steps, args.output_dir)
    try:
        with phase_callback(trainer, PhaseCallback(tuner, check_gradients, warmup_steps=steps)):
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        args.output_dir = output_dir


def restart(trainer: Trainer) -> None:
    """What ``Trainer.train`` does for a fresh model from ``model_init``: the next ``train()`` builds a new optimizer
    and LR schedule over the training phase's parameters and wraps the model anew (DDP registers parameters when it
    wraps); its step counter starts at zero."""
    trainer.optimizer, trainer.lr_scheduler = None, None
    trainer.model_wrapped = trainer.model


def find_checkpoint(output_dir: str, resume_from_checkpoint: str | os.PathLike | bool | None) -> str | None:
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is not True:
        return str(resume_from_checkpoint)
    for directory in (Path(output_dir), Path(output_dir) / WARMUP_DIR):
        if directory.is_dir() and (found := get_last_checkpoint(str(directory))) is not None:
            return found
    raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {output_dir} or {Path(output_dir) / WARMUP_DIR}")


def phase_of(checkpoint: str) -> str | None:
    """The phase of the sdt adapter in ``checkpoint``; None when it holds none (full fine-tuning saves a model)."""
    return read_config(checkpoint)["phase"] if (Path(checkpoint) / CONFIG_NAME).is_file() else None


def checkpoint_step(checkpoint: str) -> int:
    state = Path(checkpoint) / TRAINER_STATE_NAME
    if not state.is_file():
        raise ValueError(f"{checkpoint}: not a Trainer checkpoint ({TRAINER_STATE_NAME} missing)")
    return TrainerState.load_from_json(str(state)).global_step


@contextlib.contextmanager
def phase_callback(trainer: Trainer, callback: PhaseCallback) -> Iterator[None]:
    trainer.add_callback(callback)
    try:
        yield
    finally:
        trainer.remove_callback(callback)


@contextlib.contextmanager
def adapter_checkpoints(trainer: Trainer, tuner: Tuner) -> Iterator[None]:
    """Route the trainer's loading of model weights from a checkpoint through :func:`sdt.io.restore` when the
    checkpoint holds an sdt adapter (see the module docstring)."""
    load_from_checkpoint, load_best_model = checkpoint_loaders(trainer)

    def load_adapter_or_model(resume_from_checkpoint: str, model=None) -> None:
        if phase_of(resume_from_checkpoint) is None:
            load_from_checkpoint(resume_from_checkpoint, model)
        else:
            restore(tuner, resume_from_checkpoint)

    def load_best_adapter_or_model() -> None:
        best = trainer.state.best_model_checkpoint
        if phase_of(best) is None:
            load_best_model()
        else:
            logger.info("sdt: loading the best adapter, %s (score %s)", best, trainer.state.best_metric)
            restore(tuner, best)

    with checkpoint_loaders_replaced(trainer, load_adapter_or_model, load_best_adapter_or_model):
        yield
