"""The built-in ``digits`` task's data and its tiny base model, in one place: no download anywhere. (The task's
registry entry is :mod:`pipeline.tasks.builtin.digits`.)

The task: scikit-learn's bundled 8x8 digits as sequences of 61 pixel tokens (``digits_tokenizer``; the three
pixels that are blank in every image are left out, see ``BLANK_PIXELS``), images [0, 1500) shuffled
(``split_seed``) into train / validation, [1500, 1797) the fixed test set.

The base: fine-tuning has to start from a model that knows something, so sdtune ships a small ``MambaForCausalLM``
pretrained on *next-pixel modelling* of the digits training images (the 61 pixel tokens of each image of
``digits_pixel_sequences("train")``, default split: no labels, no prompt, no validation or test images) as package
data: ``pipeline/tasks/digits_base/`` (safetensors weights, config, tokenizer and ``pretrain.json``, ~270 KB). It is
what ``model: {builtin: digits}`` loads (:func:`ensure_digits_base`); nothing is trained on first use.

``sdtune pretrain`` rebuilds it from the recipe (:func:`pretrain_digits_base`, seeded, data order fixed: the same
weights bit for bit with the same torch build and thread count, float rounding apart otherwise) and compares the
rebuilt base with the shipped one (:func:`compare_bases`). Another :class:`PretrainConfig` (the tests' small ones)
is pretrained on demand and cached under ``$SDTUNE_CACHE`` (default ``~/.cache/sdtune``), in
``digits-base-<hash>``; the hash covers the config, the recipe version and sdtune's format version, so a changed
recipe never reuses a stale base, and a shipped base whose ``pretrain.json`` records another hash is not used.

Publishing into the cache is atomic and race-safe: the base is written to a private staging directory with
:func:`sdt.write_atomically` and renamed into place only if the target does not exist yet, so a crash never
leaves half a base and concurrent Ray workers keep whichever complete copy landed first. A lock file makes
workers sharing the cache wait for one pretraining instead of each running their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MambaConfig, MambaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import sdt
from pipeline.storage.paths import content_hash, file_lock
from pipeline.tasks.formatting import EOS, SEP
from pipeline.tasks.registry import DATA_SPLITS, Splits
from pipeline.tasks.splits import pool_splits, table
from sdt.io import FORMAT_VERSION

# Digits: images [0, 1500) are shuffled (split_seed) into train/validation, [1500, 1797) are the test set (297).
# A fixed test set keeps test numbers comparable across split seeds and validation fractions.
DIGITS_POOL = 1500
DIGITS_MAX_PIXEL = 16  # load_digits pixel values are 0..16
# Pixels 0, 32 and 39 (row-major) are 0 in all 1,797 images, so they carry nothing. Without them a prompt is 61
# pixels and "###", 63 tokens with its label: mambapy's parallel scan pads a sequence to a power of two, so that is
# 64 positions instead of the 128 that 66 tokens take: a CPU trains on half the positions.
BLANK_PIXELS = (0, 32, 39)


# ---------------------------------------------------------------------------------------------------------------
# The task


def digits_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over whitespace-separated pixel values for the ``digits`` and ``synthetic`` tasks.

    Ids: pixel value v is id v (0..16), then "###" (17), "<|endoftext|>" (18, eos and pad) and "<unk>" (19).
    "###" is the sep token, so it is one token even when written against a number ("16###").
    """
    vocab = {str(value): value for value in range(DIGITS_MAX_PIXEL + 1)}
    for token in (SEP, EOS, "<unk>"):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token="<unk>", sep_token=SEP
    )


def digits_splits(validation_fraction: float, split_seed: int) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = digits.data.astype(int).tolist()
    pixels = [[value for index, value in enumerate(row) if index not in BLANK_PIXELS] for row in rows]
    # The trailing space makes the prompt "... 0 ###", so "###" stays its own token for any tokenizer.
    images = table(
        {"pixels": pixels, "text": [" ".join(map(str, row)) + " " for row in pixels], "label": digits.target.tolist()}
    )
    return pool_splits(images, DIGITS_POOL, validation_fraction, split_seed)


def digits_pixel_sequences(split: str, split_seed: int = 123, validation_fraction: float = 0.2) -> list[list[int]]:
    """The 61 pixel token ids of each digits image of ``split`` (in the order `load_task` uses), without the
    instruction, separator or label: data for next-pixel pretraining. Ids are those of `digits_tokenizer`, where
    pixel value v has id v. Pass the job's split_seed / validation_fraction to get the job's train split."""
    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(DATA_SPLITS)}")
    return list(digits_splits(validation_fraction, split_seed)[split]["pixels"])


# ---------------------------------------------------------------------------------------------------------------
# The base model

# Bump when the training code changes what a config produces (loss, schedule, data order): old caches go stale.
RECIPE_VERSION = 2  # 2: the blank pixels left out
INFO_NAME = "pretrain.json"
CACHE_ENV = "SDTUNE_CACHE"


@dataclass(frozen=True)
class PretrainConfig:
    hidden: int = 64  # hidden_size
    layers: int = 2  # num_hidden_layers
    state: int = 8  # state_size
    steps: int = 200  # AdamW steps
    batch: int = 32  # images per step
    lr: float = 5e-3  # peak learning rate: linear warmup over steps // 20, then cosine decay to 0
    seed: int = 0  # weight init and data order


# A base that has learnt the pixels' structure (its validation next-pixel loss is in pretrain.json, beside the
# shipped weights), small enough to pretrain on a CPU in about a minute.
DIGITS_BASE = PretrainConfig()
# The DIGITS_BASE model, shipped with the package; `sdtune pretrain --out pipeline/tasks/digits_base` rebuilds it.
SHIPPED_BASE = Path(__file__).with_name("digits_base")


def digits_base_config(config: PretrainConfig = DIGITS_BASE) -> MambaConfig:
    """The architecture of the digits base (before any training)."""
    tokenizer = digits_tokenizer()
    return MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        state_size=config.state,
        # Pixel value 0 is token 0, MambaConfig's default bos / eos / pad: point them at the tokenizer's eos.
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # mambapy's parallel scan: ~3x faster than the sequential reference scan on CPU; a machine without it
        # falls back to that scan with the same weights.
        use_mambapy=find_spec("mambapy") is not None,
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SDTUNE_CACHE``, else ``~/.cache/sdtune``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdtune")


def config_hash(config: PretrainConfig = DIGITS_BASE) -> str:
    return content_hash(
        {"config": dataclasses.asdict(config), "recipe": RECIPE_VERSION, "format_version": FORMAT_VERSION}, 12
    )


def digits_base_dir(cache_dir: str | os.PathLike | None = None, config: PretrainConfig = DIGITS_BASE) -> Path:
    return cache_root(cache_dir) / f"digits-base-{config_hash(config)}"


def is_complete(directory: Path) -> bool:
    """pretrain.json is written last, and the directory only ever appears whole."""
    return (Path(directory) / INFO_NAME).is_file()


def shipped_base(config: PretrainConfig = DIGITS_BASE) -> Path | None:
    """The base shipped with the package when it was pretrained with ``config`` by this recipe, else None."""
    info = SHIPPED_BASE / INFO_NAME
    if info.is_file() and json.loads(info.read_text()).get("hash") == config_hash(config):
        return SHIPPED_BASE
    return None


def ensure_digits_base(
    cache_dir: str | os.PathLike | None = None,
    config: PretrainConfig = DIGITS_BASE,
    log: Callable[[str], Any] = print,
) -> Path:
    """The base for ``config``: the shipped one (:func:`shipped_base`), else the cached one, pretrained and
    published into the cache when missing."""
    shipped = shipped_base(config)
    if shipped is not None:
        return shipped
    target = digits_base_dir(cache_dir, config)
    if is_complete(target):
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if is_complete(target):  # another worker finished it while we waited for the lock
            log(f"digits base: using {target}, pretrained by another process")
            return target
        log(f"digits base: pretraining {config} into {target}")
        return _publish(target, lambda tmp: pretrain_digits_base(tmp, config, log))


def pretrain_digits_base(
    out_dir: str | os.PathLike, config: PretrainConfig = DIGITS_BASE, log: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Train the base for ``config`` and save it (model, tokenizer, ``pretrain.json``) into ``out_dir``.

    Returns ``{"initial_loss", "final_loss", "steps", "validation_loss", "seconds"}``: the loss of the first batch
    before any update, the mean loss of the last ``max(1, steps // 10)`` batches, and the next-pixel loss on the
    validation images after training. ``out_dir`` is written in place; :func:`ensure_digits_base` is the atomic,
    cached entry point.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tokenizer = digits_tokenizer()
    train = torch.tensor(digits_pixel_sequences("train"), dtype=torch.long)
    validation = torch.tensor(digits_pixel_sequences("validation"), dtype=torch.long)
    if config.batch > len(train):
        raise ValueError(f"batch {config.batch} is larger than the {len(train)} training images")

    model_config = digits_base_config(config)
    # fork_rng: seed the init without touching the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MambaForCausalLM(model_config).float()
    # Where mamba-ssm is installed, transformers routes every Mamba through its CUDA kernels, which refuse CPU
    # tensors: on such a machine the base must train on the GPU (its weights then differ in the last digits).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    losses = _train(model, train, config, device, log)
    model.eval()
    tail = losses[-max(1, config.steps // 10) :]
    result = {
        "initial_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "steps": config.steps,
        "validation_loss": next_pixel_loss(model, validation),
    }
    result["seconds"] = round(time.perf_counter() - started, 2)
    log(
        f"digits base: loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}, validation "
        f"{result['validation_loss']:.4f}, {result['seconds']:.1f} s"
    )

    _save(out_dir, model, tokenizer, config, result)
    return result


def _train(
    model: MambaForCausalLM,
    train: torch.Tensor,
    config: PretrainConfig,
    device: torch.device,
    log: Callable[[str], Any],
) -> list[float]:
    """Next-pixel training of ``model`` on ``train`` by ``config``'s recipe (AdamW, a linear warmup into a cosine
    decay, gradient clipping at 1); returns every step's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    for step, batch in enumerate(_batches(len(train), config.batch, config.steps, config.seed)):
        tokens = train[batch].to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            log(f"digits base: step {step + 1}/{config.steps} loss {losses[-1]:.4f}")
    return losses


def _save(out_dir: Path, model, tokenizer, config: PretrainConfig, result: dict[str, Any]) -> None:
    """The base (model, tokenizer) and ``pretrain.json``, its recipe and results, written last: it marks the
    directory complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "config": dataclasses.asdict(config),
        "hash": config_hash(config),
        "recipe": RECIPE_VERSION,
        "format_version": FORMAT_VERSION,
        "data": "digits_pixel_sequences('train'), next-pixel loss",
        "torch": torch.__version__,
        **result,
    }
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def rebuild_digits_base(out_dir: str | os.PathLike, log: Callable[[str], Any] = print) -> dict[str, float]:
    """Pretrain the default base from its recipe into ``out_dir`` (replacing it atomically) and compare it with the
    shipped one (:func:`compare_bases`)."""
    sdt.write_atomically(out_dir, lambda tmp: pretrain_digits_base(tmp, DIGITS_BASE, log))
    return compare_bases(Path(out_dir), SHIPPED_BASE)


def compare_bases(rebuilt: Path, reference: Path) -> dict[str, float]:
    """How far two digits bases are apart: the largest absolute difference of any weight, and each one's
    next-pixel loss on the validation images (nats per pixel)."""
    from safetensors.torch import load_file

    ours, theirs = load_file(str(rebuilt / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    if ours.keys() != theirs.keys():
        raise ValueError(f"{rebuilt} and {reference} hold different weights: {sorted(ours.keys() ^ theirs.keys())[:5]}")
    validation = torch.tensor(digits_pixel_sequences("validation"), dtype=torch.long)
    losses = [
        next_pixel_loss(MambaForCausalLM.from_pretrained(path).float(), validation) for path in (rebuilt, reference)
    ]
    return {
        "max_weight_difference": max((ours[key] - theirs[key]).abs().max().item() for key in ours),
        "validation_loss": losses[0],
        "reference_validation_loss": losses[1],
    }


@torch.no_grad()
def next_pixel_loss(
    model: PreTrainedModel, sequences: Sequence[Sequence[int]] | torch.Tensor, batch: int = 256
) -> float:
    """Mean next-token cross-entropy (nats per predicted pixel) of ``model`` over ``sequences`` (equal lengths)."""
    tokens = torch.as_tensor(sequences, dtype=torch.long)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(tokens), batch):
        chunk = tokens[start : start + batch].to(device)
        total += model(input_ids=chunk, labels=chunk).loss.float().item() * len(chunk)
    model.train(was_training)
    return total / len(tokens)


def _batches(size: int, batch: int, steps: int, seed: int):
    """``steps`` index batches: seeded permutations of ``range(size)``, one per epoch, remainders dropped."""
    generator = torch.Generator().manual_seed(seed)
    emitted = 0
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch + 1, batch):
            if emitted == steps:
                return
            yield order[start : start + batch]
            emitted += 1


def _publish(target: Path, write: Callable[[Path], Any]) -> Path:
    """Write a complete directory with ``write(tmp)`` and move it to ``target`` unless a complete one is there.

    ``sdt.write_atomically`` would *replace* an existing target, pulling it from under a worker that is loading it,
    so it writes to a private staging name and a plain ``os.rename`` (which refuses to replace a non-empty
    directory) publishes it: the first complete copy wins and later ones are dropped.
    """
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        sdt.write_atomically(staging, write)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):
                # A leftover we did not write (no pretrain.json): replace it with the complete copy.
                sdt.write_atomically(target, lambda tmp: shutil.copytree(staging, tmp, dirs_exist_ok=True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
