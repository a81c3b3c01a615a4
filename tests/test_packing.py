"""Batches without padding that stay exact (pipeline.tasks.batching, sdt.fused.mamba2's seq_idx), and the layouts'
epochs.

Exactness: a packed row (several examples end to end, ``seq_idx`` numbering them) must give each example the loss it
has alone, and every trainable tensor the gradient it gets from the examples one at a time: on the CPU through the
fused Mamba-2 path with the pure-PyTorch reference kernels, marked ``cuda`` on mamba-ssm's kernels.
"""

from __future__ import annotations

import copy as copy_module
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import hybrid_config
from fused_reference import ReferenceMamba2Kernels
from helpers import VOCAB
from test_fused_hybrids import cuda_config as hybrid_cuda_config
from test_fused_hybrids import training_tuner as hybrid_tuner
from test_fused_mamba2 import CUDA_CONFIG, CUDA_VOCAB, relative_error, training_tuner
from transformers import AutoModelForCausalLM, Mamba2ForCausalLM

import sdt
from pipeline.tasks.batching import LAYOUTS, SEQ_IDX, batches_per_rank, epoch_batches, packed_row
from pipeline.tasks.formatting import IGNORE_INDEX, Example, pad_rows, token_row
from sdt.fused import install_fused_path, keeps_packed_examples_apart, uninstall_fused_path
from sdt.fused.mamba2 import packed_positions

# fp32 on both sides, through the same reference kernels: a packed row and a row of one example differ only in the
# shapes of the projections' matmuls, whose sums round in another order (~1e-7 relative seen); an example that
# reads its neighbour's state or conv input is off by its whole contribution
TOLERANCE = 1e-5


def random_examples(lengths: list[int], vocab: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Rows (tokens, where the answer starts) of the given lengths, each with a prompt of at least one token."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        answer_start = int(torch.randint(1, length - 1, (1,), generator=generator))
        rows.append((torch.randint(0, vocab, (length,), generator=generator), answer_start))
    return rows


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each position's cross-entropy against the next label (0 where it is -100), as a causal LM's loss shifts."""
    shifted = labels[1:]
    losses = F.cross_entropy(logits[:-1].float(), shifted.clamp_min(0), reduction="none")
    return losses * (shifted != IGNORE_INDEX)


def labelled_tokens(rows) -> int:
    """The answer tokens of ``rows``: each is predicted from the token before it, in its own example."""
    return sum(len(tokens) - answer_start for tokens, answer_start in rows)


def packed_losses_and_grads(tuner: sdt.Tuner, rows, device: str = "cpu"):
    """Per-example loss sums from one packed row, and every trainable gradient of their token mean."""
    batch = {key: value.to(device) for key, value in packed_row(rows).items()}
    tuner.model.train().zero_grad(set_to_none=True)
    output = tuner.model(**batch)
    losses = token_losses(output.logits[0], batch["labels"][0])
    ends = torch.tensor([len(tokens) for tokens, _ in rows]).cumsum(0).tolist()
    per_example = torch.stack([losses[start : end - 1].sum() for start, end in zip([0, *ends], ends)])
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in tuner.named_trainable_parameters()}
    return per_example.detach(), output.loss.detach(), grads


def alone_losses_and_grads(tuner: sdt.Tuner, rows, device: str = "cpu"):
    """The same, each example alone in its own forward; gradients accumulated over them, scaled as the packed row's
    token mean scales them."""
    labelled = labelled_tokens(rows)
    tuner.model.train().zero_grad(set_to_none=True)
    per_example = []
    for row in rows:
        batch = {key: value.to(device) for key, value in pad_rows([row], 0).items() if key != "attention_mask"}
        logits = tuner.model(input_ids=batch["input_ids"]).logits[0]
        loss_sum = token_losses(logits, batch["labels"][0]).sum()
        (loss_sum / labelled).backward()
        per_example.append(loss_sum.detach())
    grads = {name: p.grad.detach().clone() for name, p in tuner.named_trainable_parameters()}
    return torch.stack(per_example), grads


def assert_same(packed, alone, labelled: int, tolerance: float) -> None:
    """Each example's loss, the packed row's mean over its ``labelled`` answer tokens, and every gradient."""
    (losses, mean, grads), (losses_alone, grads_alone) = packed, alone
    torch.testing.assert_close(losses, losses_alone, rtol=tolerance, atol=0)
    assert mean.item() == pytest.approx(losses_alone.sum().item() / labelled, rel=tolerance)
    assert grads.keys() == grads_alone.keys()
    for name, reference in grads_alone.items():
        assert reference.norm() > 0, f"{name} got no gradient from the examples"
        error = relative_error(grads[name], reference)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("method", ["sdlora", "lora", "full"])
def test_packed_row_equals_the_examples_one_at_a_time(load_base, method):
    tuner = training_tuner(load_base("mamba2"), method)
    kernels = ReferenceMamba2Kernels()
    install_fused_path(tuner.model, kernels=kernels)
    assert keeps_packed_examples_apart(tuner.model)
    rows = random_examples([7, 11, 5, 9], VOCAB, seed=0)
    packed = packed_losses_and_grads(tuner, rows)
    assert kernels.calls > 0, "the fused path did not run"
    assert_same(packed, alone_losses_and_grads(tuner, rows), labelled_tokens(rows), TOLERANCE)


def test_packed_rows_stay_exact_under_gradient_checkpointing_and_in_a_deep_copy(load_base):
    """The mixers keep the seq_idx the model's pre-hook handed them until the next forward: a backward that recomputes
    a checkpointed block sees it. A deep copy of the model hands it to its own mixers."""
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    tuner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = random_examples([6, 10, 8], VOCAB, seed=1)
    alone = alone_losses_and_grads(tuner, rows)  # its last forward left the mixers no seq_idx
    copy = copy_module.deepcopy(tuner)
    losses, _, _ = packed_losses_and_grads(copy, rows)
    torch.testing.assert_close(losses, alone[0], rtol=TOLERANCE, atol=0)
    assert_same(packed_losses_and_grads(tuner, rows), alone, labelled_tokens(rows), TOLERANCE)


def test_seq_idx_after_the_fused_path_is_taken_off_is_an_error(load_base):
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    uninstall_fused_path(tuner.model)
    assert not keeps_packed_examples_apart(tuner.model)
    with pytest.raises(ValueError, match=r"^seq_idx: the Mamba-2 mixers are off the fused path"):
        tuner.model(**packed_row(random_examples([6, 6], VOCAB, seed=1)))


def test_transformers_path_cannot_keep_examples_apart(load_base):
    """Why packing is on only where the fused path runs: transformers' own CPU path either refuses ``seq_idx``
    (5.25: its conv has no kernel that takes it) or ignores it (earlier 5.x), and then the second example of a row
    reads the first one's state and conv input."""
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    uninstall_fused_path(tuner.model)
    assert not keeps_packed_examples_apart(tuner.model)
    rows = random_examples([9, 9], VOCAB, seed=2)
    try:
        losses, _, _ = packed_losses_and_grads(tuner, rows)
    except ValueError as refusal:
        assert "can't keep packed sequences apart" in str(refusal)
        return
    alone, _ = alone_losses_and_grads(tuner, rows)
    assert losses[0] == pytest.approx(alone[0].item(), rel=TOLERANCE)  # the first example has no neighbour before it
    assert abs(losses[1] - alone[1]) > 1e-3 * alone[1]


def test_seq_idx_off_the_fused_path_is_an_error(load_base):
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    batch = packed_row(random_examples([6, 6], VOCAB, seed=1))
    tuner.model.eval()  # evaluation runs transformers' forward, which would mix the examples
    with pytest.raises(ValueError, match=r"^seq_idx: packed rows need the fused path's training forward"):
        tuner.model(**batch)


PACKING_HYBRIDS = ["bamba", "nemotron_h", "falcon_h1", "zamba2"]


def hybrid_training_tuner(arch: str) -> sdt.Tuner:
    """A tiny hybrid in its training phase (the hybrid preset, adapters off their init), on the fused path through
    the reference kernels."""
    torch.manual_seed(0)
    config = hybrid_config(arch)
    tuner = hybrid_tuner(AutoModelForCausalLM.from_config(config), config.vocab_size)
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    return tuner


@pytest.mark.parametrize("arch", PACKING_HYBRIDS)
def test_a_hybrid_packed_row_equals_the_examples_one_at_a_time(arch):
    """The hybrids whose model gives its position ids to transformers' mask: the handoff gives them position ids that
    restart at each example (and no cache), so attention stays within an example and the Mamba-2 layers get
    ``seq_idx``; every loss and gradient equals the examples' one at a time."""
    tuner = hybrid_training_tuner(arch)
    assert keeps_packed_examples_apart(tuner.model)
    rows = random_examples([7, 11, 5, 9], tuner.model.config.vocab_size, seed=0)
    packed = packed_losses_and_grads(tuner, rows)
    assert_same(packed, alone_losses_and_grads(tuner, rows), labelled_tokens(rows), TOLERANCE)


def test_granite_4_h_refuses_packed_rows_its_attention_would_mix():
    """Granite-4.0-H's model builds its mask without the position ids: packed examples would attend to each other."""
    tuner = hybrid_training_tuner("granitemoehybrid")
    assert not keeps_packed_examples_apart(tuner.model)
    batch = packed_row(random_examples([6, 6], tuner.model.config.vocab_size, seed=1))
    with pytest.raises(ValueError, match=r"^seq_idx: granitemoehybrid's attention would mix the examples"):
        tuner.model(**batch)


def test_packed_positions_count_from_each_examples_start():
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 2, 2]], dtype=torch.int32)
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 0, 1]]
    assert packed_positions(seq_idx).tolist() == expected


def test_mamba1_never_keeps_packed_examples_apart(load_base):
    tuner = sdt.apply(load_base("mamba"), sdt.SDTConfig.preset("lora"))
    assert not keeps_packed_examples_apart(tuner.model)


def test_packed_row_layout():
    """Examples end to end, seq_idx numbering them, answer tokens labelled, and no label on an example's first
    token (the model would learn to predict it from the example before)."""
    rows = [token_row(Example([1, 2], [3], 0)), token_row(Example([4], [5, 6], 0)), (torch.tensor([7, 8, 9]), 0)]
    batch = packed_row(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch[SEQ_IDX].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] and batch[SEQ_IDX].dtype == torch.int32
    assert batch["labels"].tolist() == [[-100, -100, 3, -100, 5, 6, -100, 8, 9]]


# -- the layouts' epochs --------------------------------------------------------------------------------------------

# 103 examples whose lengths vary twentyfold, as a generation task's do: a dialogue summary's prompt runs from a line
# to pages
LENGTHS = [length + offset % 7 for offset, length in enumerate(random.Random(7).choices([20, 60, 150, 400], k=103))]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_keeps_the_step_count_and_its_order_comes_from_the_seed(layout):
    batch_size, world = 4, 2
    per_rank = batches_per_rank(len(LENGTHS), batch_size, world)
    epoch = epoch_batches(LENGTHS, layout, batch_size, world, seed=3, epoch=0)
    assert per_rank == 12 and len(epoch) == per_rank * world
    assert epoch == epoch_batches(LENGTHS, layout, batch_size, world, seed=3, epoch=0)
    assert epoch != epoch_batches(LENGTHS, layout, batch_size, world, seed=4, epoch=0)
    assert epoch != epoch_batches(LENGTHS, layout, batch_size, world, seed=3, epoch=1)
    visits = Counter(index for batch in epoch for index in batch)
    assert set(visits.values()) == {1} and all(batch for batch in epoch)
    if layout == "padded":  # the remainder is dropped, as the official runs drop the last partial batch
        assert len(visits) == 24 * batch_size and {len(batch) for batch in epoch} == {batch_size}
    else:  # every example exactly once, in batches of about equal token counts
        assert len(visits) == len(LENGTHS)
        share = sum(LENGTHS) / len(epoch)
        assert all(abs(sum(LENGTHS[i] for i in batch) - share) <= max(LENGTHS) for batch in epoch)


def padding_share(epoch: list[list[int]]) -> float:
    """The share of pad positions when each batch's rows are padded to its longest."""
    positions = sum(len(batch) * max(LENGTHS[i] for i in batch) for batch in epoch)
    return 1 - sum(LENGTHS[i] for batch in epoch for i in batch) / positions


def test_grouped_batches_pad_little_where_padded_ones_pad_much():
    padded = epoch_batches(LENGTHS, "padded", 4, 1, seed=0, epoch=0)
    grouped = epoch_batches(LENGTHS, "grouped", 4, 1, seed=0, epoch=0)
    # lengths 20 to 502 in four clusters: shuffled batches of 4 pad about half their positions, sorted ones a few %
    assert padding_share(padded) > 0.4 and padding_share(grouped) < 0.05


def test_grouped_epochs_of_many_batches_pad_little_and_change_their_batches():
    """Sorted within pools of about 50 batches, not all at once (which, with no two lengths alike, would batch the
    same examples together in every epoch): each epoch batches other neighbours, and its batches still pad little."""
    lengths = random.Random(5).sample(range(10, 1010), 1000)  # 10 to 1,009 tokens, no two alike
    epochs = [epoch_batches(lengths, "grouped", 2, 2, seed=0, epoch=epoch) for epoch in (0, 1)]
    for epoch in epochs:
        assert len(epoch) == 500 and sorted(i for batch in epoch for i in batch) == list(range(1000))
        positions = sum(len(batch) * max(lengths[i] for i in batch) for batch in epoch)
        assert 1 - sum(lengths) / positions < 0.05
    # a batch of one long example comes back as it was; of the others, few
    shared = [{frozenset(batch) for batch in epoch if len(batch) > 1} for epoch in epochs]
    assert len(shared[0] & shared[1]) < 0.05 * len(shared[0])


def test_worker_batches_count_a_packed_row_as_all_tokens():
    from pipeline.trial.worker import Batches

    examples = [Example([1] * (length - 1), [2], 0) for length in (3, 5, 8, 4, 6, 2, 7, 9)]
    batches = Batches(examples, batch_size=2, seed=0, rank=0, world=1, pad_id=0)
    batches.use("packed")
    handed = [batch for _, batch in batches.epoch(0, torch.device("cpu"))]
    assert len(handed) == 4 and all(batch["input_ids"].shape[0] == 1 for batch in handed)
    assert (batches.positions, batches.tokens) == (44, 44) and batches.padding_since(0, 0) == 0.0


# -- on the GPU -----------------------------------------------------------------------------------------------------

# fp32 through mamba-ssm's Triton kernels, whose dot products run in tf32 on Hopper: a packed row's chunks hold other
# positions than a lone example's, so their sums round differently, ~1e-3 relative (as tests/test_fused_mamba2.py's
# CUDA tolerance); a state or conv input leaking from the example before is off by its whole contribution (order 1)
CUDA_TOLERANCE = 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["sdlora", "full"])
def test_cuda_packed_row_equals_the_examples_one_at_a_time(method):
    torch.manual_seed(0)
    tuner = training_tuner(Mamba2ForCausalLM(CUDA_CONFIG).cuda(), method, vocab=CUDA_VOCAB)
    assert keeps_packed_examples_apart(tuner.model), tuner.kernel_path
    # lengths across the kernels' 64-position chunks: examples that start and end inside a chunk and span several
    rows = random_examples([40, 130, 7, 64, 91], CUDA_VOCAB, seed=0)
    packed = packed_losses_and_grads(tuner, rows, device="cuda")
    alone = alone_losses_and_grads(tuner, rows, device="cuda")
    assert_same(packed, alone, labelled_tokens(rows), CUDA_TOLERANCE)


@pytest.mark.cuda
def test_cuda_a_hybrid_packed_row_equals_the_examples_one_at_a_time():
    """Bamba on mamba-ssm's kernels and transformers' attention with the packed mask its position ids give."""
    torch.manual_seed(0)
    tuner = hybrid_tuner(AutoModelForCausalLM.from_config(hybrid_cuda_config("bamba")).cuda(), CUDA_VOCAB)
    assert keeps_packed_examples_apart(tuner.model), tuner.kernel_path
    rows = random_examples([40, 130, 7, 64, 91], CUDA_VOCAB, seed=0)
    packed = packed_losses_and_grads(tuner, rows, device="cuda")
    alone = alone_losses_and_grads(tuner, rows, device="cuda")
    assert_same(packed, alone, labelled_tokens(rows), CUDA_TOLERANCE)


# -- a trial ---------------------------------------------------------------------------------------------------------

# The largest of 2 to 30 pixel values: a generation task over the digits tokenizer whose examples vary in length
# fifteenfold, so that padded batches would be mostly padding.
VARIED_TASK = """
import numpy as np

from pipeline.tasks.registry import Task, register_task
from pipeline.tasks.splits import carved_train_rows, pool_splits, table

POOL, TEST = 96, 8


def splits(data):
    rng = np.random.default_rng(data.split_seed)
    values = [rng.integers(0, 17, size=rng.integers(2, 31)).tolist() for _ in range(POOL + TEST)]
    texts = [" ".join(map(str, row)) + " " for row in values]
    rows = table({"text": texts, "target": [str(max(row)) for row in values]})
    return pool_splits(rows, POOL, data.validation_fraction, data.split_seed)


register_task(Task(
    name="varied", summary="the largest of 2 to 30 pixel values", kind="generation", splits=splits,
    headline=lambda data: "exact_match", train_rows=lambda data: carved_train_rows(POOL, data.validation_fraction),
))
"""


def varied_trial(tmp_path: Path, digits_cache: Path, **changes) -> tuple[dict[str, str], str, list[Example]]:
    """``sdtune train`` of a LoRA trial on the varied task (the job changed by ``changes``): what it printed (its
    metrics as ``key: value`` lines), all of its output, and its training examples as the trial saw them."""
    from processes import failure, plugin_env, sdtune

    from pipeline.spec.job import parse_job
    from pipeline.tasks.sources import load_task
    from pipeline.trial.models import load_base_model

    (tmp_path / "varied_task.py").write_text(VARIED_TASK)
    job = {
        "name": "varied",
        "imports": ["varied_task"],
        "output_dir": str(tmp_path / "runs"),
        "model": {"builtin": "digits"},
        "data": {"task": "varied", "max_length": 24, "max_new_tokens": 2},
        "method": {"name": "lora"},
        "training": {"epochs": 1, "batch_size": 4, "zero_stage": 0, "eval_batch_size": 32},
        "search": {"metric": "eval/exact_match"},
        **changes,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = sdtune("train", str(path), env=plugin_env(digits_cache, tmp_path))
    assert result.returncode == 0, failure(result)
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    sys.path.insert(0, str(tmp_path))
    spec = parse_job(job)
    _, tokenizer = load_base_model(spec.model, torch.device("cpu"))
    return printed, result.stdout + result.stderr, load_task(spec.data, tokenizer).train


def assert_truncations_counted(printed: dict[str, str], output: str, train: list[Example]) -> None:
    too_long = sum(1 for e in train if e.cut)
    assert 0 < too_long < len(train) and max(len(e.prompt_ids) + len(e.answer_ids) for e in train) == 24
    assert int(float(printed["train/truncated_examples"])) == too_long
    assert f"WARNING: {too_long} train" in output


def test_a_trial_on_varied_lengths_groups_them_and_counts_what_it_truncates(tmp_path, digits_cache):
    """On the CPU (transformers' path: packing would not be exact) ``auto`` groups by length: the trial reports
    the layout and a padding share far below what shuffled batches pad, and counts, never drops, the examples
    longer than data.max_length."""
    printed, output, train = varied_trial(tmp_path, digits_cache)
    assert printed["batching"] == "grouped"
    assert_truncations_counted(printed, output, train)
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in train]
    whole = len(lengths) // 4 * 4
    shuffled = 1 - sum(lengths[:whole]) / sum(4 * max(lengths[i : i + 4]) for i in range(0, whole, 4))
    assert float(printed["train/padding"]) < 0.1 < shuffled


@pytest.mark.cuda
def test_cuda_a_mamba2_trial_on_varied_lengths_packs_them(tmp_path, digits_cache):
    """On the GPU a Mamba-2 on the fused path packs: no pad position at all, every example counted once."""
    config = {"hidden_size": 256, "num_hidden_layers": 2, "state_size": 128, "num_heads": 8, "head_dim": 64,
              "n_groups": 1, "chunk_size": 64}  # fmt: skip
    printed, output, train = varied_trial(
        tmp_path,
        digits_cache,
        model={"architecture": "mamba2", "config": config},
        method={"name": "lora", "lora_targets": ["in_proj", "out_proj"]},  # the preset's x_proj/dt_proj are Mamba-1's
        resources={"use_gpu": True},
    )
    assert printed["batching"] == "packed" and float(printed["train/padding"]) == 0.0
    assert_truncations_counted(printed, output, train)
