"""pipeline.tasks.sources, .formatting and .metrics: tasks, prompt format, splits, collation, and metrics checked
against hand-computed values."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from sklearn.datasets import load_digits
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationMixin,
    MambaConfig,
    MambaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutput

from pipeline.spec.job import DataSpec
from pipeline.tasks.digits import BLANK_PIXELS, digits_pixel_sequences, digits_tokenizer
from pipeline.tasks.formatting import Example, collate, pad_token_id
from pipeline.tasks.metrics import evaluate
from pipeline.tasks.sources import load_task

DATA = Path(__file__).parent / "data"
RTE = {"train": str(DATA / "rte" / "train.jsonl"), "validation": str(DATA / "rte" / "validation.jsonl")}
SAMSUM = {split: str(DATA / "samsum" / f"{split}.csv") for split in ("train", "validation", "test")}
EXTRA_WORDS = "0 1 2 alpha beta gamma delta one two the cat sat on a soft mat yes no"


def jsonl(path: Path, rows: list[dict]) -> dict[str, str]:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {split: str(path) for split in ("train", "validation", "test")}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def digits_tok():
    return digits_tokenizer()


@pytest.fixture(scope="module")
def digits_task(digits_tok):
    return load_task(DataSpec(), digits_tok)


@pytest.fixture(scope="module")
def text_tok(tmp_path_factory):
    """A word-level tokenizer trained on the fixture texts, saved and loaded back the way users load theirs."""
    texts = [EXTRA_WORDS]
    for split in datasets.load_dataset("json", data_files=RTE).values():
        texts += list(split["sentence1"]) + list(split["sentence2"])
    for split in datasets.load_dataset("csv", data_files=SAMSUM).values():
        texts += list(split["dialogue"]) + list(split["summary"])
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "<unk>", "###"]))
    path = tmp_path_factory.mktemp("text-tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>", sep_token="###"
    ).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def tiny_mamba(vocab_size: int) -> MambaForCausalLM:
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, state_size=8))


class LookupLM(torch.nn.Module):
    """Logits at position t are row ``input_ids[t - 1]`` of a fixed table: the prediction at "###" is set by the
    word before it."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        previous = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        return CausalLMOutput(logits=self.table[previous])


class FixedConfig(PretrainedConfig):
    model_type = "fixed-continuation"


class FixedContinuationLM(PreTrainedModel, GenerationMixin):
    """After the last "###" it predicts ``script`` token by token (logit 10, others 0), then eos forever."""

    config_class = FixedConfig

    def __init__(self, config: FixedConfig, sep_id: int, script: list[int]) -> None:
        super().__init__(config)
        self.sep_id = sep_id
        self.register_buffer("script", torch.tensor([*script, config.eos_token_id]))
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the model a device

    def forward(self, input_ids, attention_mask=None, **kwargs):
        position = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_sep = torch.where(input_ids == self.sep_id, position, -(10**6)).cummax(dim=1).values
        step = (position - last_sep).clamp(max=len(self.script) - 1)
        return CausalLMOutput(
            logits=10.0 * torch.nn.functional.one_hot(self.script[step], self.config.vocab_size).float()
        )

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids}  # no cache: every step sees the whole sequence


# ---------------------------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits_tokenizer_vocabulary(digits_tok):
    assert len(digits_tok) == 20
    assert digits_tok("0 7 16 ###", add_special_tokens=False)["input_ids"] == [0, 7, 16, 17]
    assert digits_tok("16###")["input_ids"] == [16, 17]  # "###" is its own token
    assert digits_tok.eos_token_id == digits_tok.pad_token_id == pad_token_id(digits_tok) == 18
    assert digits_tok("no", add_special_tokens=False)["input_ids"] == [digits_tok.unk_token_id]


def test_digits_splits_are_fixed_and_deterministic(digits_tok, digits_task):
    task = digits_task
    assert (task.kind, len(task.train), len(task.validation), len(task.test)) == ("classification", 1200, 300, 297)
    assert task.label_names == [str(d) for d in range(10)]
    assert task.metric_names[0] == "accuracy" and "loss" in task.metric_names

    digits = load_digits()
    # The three pixels that are blank in every image are left out of the sequences
    assert (digits.data[:, list(BLANK_PIXELS)] == 0).all()
    images = [tuple(v for i, v in enumerate(row) if i not in BLANK_PIXELS) for row in digits.data.astype(int).tolist()]

    def prompts(examples):
        return [tuple(e.prompt_ids[:-1]) for e in examples]

    # train + validation partition the first 1500 images; test is images 1500..1796 in order.
    assert Counter(prompts(task.train) + prompts(task.validation)) == Counter(images[:1500])
    assert prompts(task.test) == images[1500:]
    assert [e.reference for e in task.test] == digits.target[1500:].tolist()

    again = load_task(DataSpec(), digits_tok)
    assert (again.train, again.validation, again.test) == (task.train, task.validation, task.test)
    reseeded = load_task(DataSpec(split_seed=7), digits_tok)
    assert reseeded.train != task.train and reseeded.test == task.test

    for split in (task.train, task.validation, task.test):
        counts = Counter(e.reference for e in split)
        assert sorted(counts) == list(range(10))
        assert max(counts.values()) / len(split) < 0.15 and min(counts.values()) / len(split) > 0.05


def test_digits_prompt_and_answer_format(digits_task):
    for example in digits_task.train[:50]:
        # 61 pixels and "###": with the label 63 tokens, one parallel-scan block of 64 on a CPU
        assert len(example.prompt_ids) == 62 and example.prompt_ids[-1] == 17
        assert all(0 <= i <= 16 for i in example.prompt_ids[:-1])
        assert example.answer_ids == [example.reference]  # label "d" is token id d, no eos


def test_digits_pixel_sequences_match_the_prompts(digits_task):
    for split in ("train", "validation", "test"):
        sequences = digits_pixel_sequences(split)
        assert sequences == [e.prompt_ids[:-1] for e in getattr(digits_task, split)]
    assert digits_pixel_sequences("train", split_seed=7) != digits_pixel_sequences("train")
    with pytest.raises(ValueError, match="unknown split"):
        digits_pixel_sequences("dev")


def test_synthetic_task_is_tiny_balanced_and_follows_its_rule(digits_tok):
    task = load_task(DataSpec(task="synthetic"), digits_tok)
    assert (len(task.train), len(task.validation), len(task.test)) == (256, 64, 80)
    for example in task.train + task.validation + task.test:
        tokens = example.prompt_ids[:-1]
        assert len(tokens) == 5 and example.prompt_ids[-1] == 17
        assert example.reference == int(sum(t >= 8 for t in tokens) >= 3)
    assert 0.35 < sum(e.reference for e in task.train) / len(task.train) < 0.65
    assert load_task(DataSpec(task="synthetic"), digits_tok).train == task.train
    assert load_task(DataSpec(task="synthetic", split_seed=1), digits_tok).train != task.train


def test_sample_caps_apply_after_splitting(digits_tok, digits_task):
    capped = load_task(DataSpec(max_train_samples=50, max_eval_samples=20), digits_tok)
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (50, 20, 20)
    full = {
        split: {tuple(e.prompt_ids) for e in getattr(digits_task, split)} for split in ("train", "validation", "test")
    }
    for split in ("train", "validation", "test"):
        assert {tuple(e.prompt_ids) for e in getattr(capped, split)} <= full[split]


def test_collate_pads_right_and_labels_only_the_answer(digits_tok):
    short = Example(prompt_ids=[3, 4, 17], answer_ids=[5], reference=5)
    long = Example(prompt_ids=[1, 2, 3, 4, 17], answer_ids=[6, 7, 18], reference="x")
    batch = collate([short, long], pad_id=18)
    assert batch["input_ids"].tolist() == [[3, 4, 17, 5, 18, 18, 18, 18], [1, 2, 3, 4, 17, 6, 7, 18]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 5, -100, -100, -100, -100], [-100] * 5 + [6, 7, 18]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]

    # Hugging Face shifts the labels itself: its loss is the cross-entropy of the answer tokens, predicted from
    # the position before each of them.
    model = tiny_mamba(len(digits_tok)).eval()
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits
    manual = torch.stack(
        [
            -logits[0, 2].log_softmax(-1)[5],
            -logits[1, 4].log_softmax(-1)[6],
            -logits[1, 5].log_softmax(-1)[7],
            -logits[1, 6].log_softmax(-1)[18],
        ]
    ).mean()
    torch.testing.assert_close(out.loss, manual)


# ---------------------------------------------------------------------------------------------------------------
# Local GLUE-, SAMSum- and generic files


def test_glue_local_rte_split_and_format(text_tok):
    spec = DataSpec(
        task="glue", subset="rte", data_files=RTE, instruction="Does the first sentence entail the second? "
    )
    task = load_task(spec, text_tok)
    assert (task.kind, len(task.train), len(task.validation), len(task.test)) == ("classification", 8, 2, 4)
    assert task.label_names == ["0", "1"]
    assert task.metric_names[:3] == ("accuracy", "f1", "matthews")

    # The official protocol: train_test_split(0.2, seed=123) of train; the validation file is the test set.
    raw = datasets.load_dataset("json", data_files=RTE)
    carved = raw["train"].train_test_split(test_size=0.2, seed=123)
    for examples, rows in (
        (task.train, carved["train"]),
        (task.validation, carved["test"]),
        (task.test, raw["validation"]),
    ):
        assert [e.reference for e in examples] == list(rows["label"])
        for example, row in zip(examples, rows):
            expected = text_tok(f"{spec.instruction}{row['sentence1']}###{row['sentence2']}###")["input_ids"]
            assert example.prompt_ids == expected
            assert example.prompt_ids[-1] == text_tok.sep_token_id
            assert example.answer_ids == text_tok(str(row["label"]), add_special_tokens=False)["input_ids"]


def test_glue_headline_metric_per_subset(text_tok):
    cola = load_task(DataSpec(task="glue", subset="cola", data_files=RTE, columns={"text": "sentence1"}), text_tok)
    assert cola.metric_names[0] == "matthews"
    assert text_tok.decode(cola.train[0].prompt_ids).count("###") == 1  # one sentence, one separator
    mrpc = load_task(
        DataSpec(task="glue", subset="mrpc", data_files=RTE, columns={"text": "sentence1", "text_pair": "sentence2"}),
        text_tok,
    )
    assert mrpc.metric_names[:2] == ("accuracy", "f1")
    with pytest.raises(ValueError, match="no column"):
        load_task(DataSpec(task="glue", subset="sst2", data_files=RTE), text_tok)  # sst2 expects "sentence"
    with pytest.raises(ValueError, match="no default columns"):
        load_task(DataSpec(task="glue", subset="stsb", data_files=RTE), text_tok)


def test_samsum_local_csv(text_tok):
    # "samsum" in the file paths selects the dialogue -> summary columns.
    task = load_task(DataSpec(task="generation", data_files=SAMSUM), text_tok)
    assert (task.kind, len(task.train), len(task.validation), len(task.test)) == ("generation", 6, 2, 2)
    assert task.metric_names[0] == "rouge1" and task.label_names is None
    raw = datasets.load_dataset("csv", data_files=SAMSUM)
    for split in ("train", "validation", "test"):  # all three given: used as they are
        for example, row in zip(getattr(task, split), raw[split]):
            assert example.reference == row["summary"]
            assert example.prompt_ids == text_tok(row["dialogue"] + "###")["input_ids"]
            answer = text_tok(row["summary"], add_special_tokens=False)["input_ids"]
            assert example.answer_ids == [*answer, text_tok.eos_token_id]

    # Without a test file: validation is carved out of train and the validation file becomes the test set.
    two = load_task(DataSpec(task="generation", data_files={k: SAMSUM[k] for k in ("train", "validation")}), text_tok)
    assert (len(two.train), len(two.validation)) == (4, 2)  # train_test_split rounds the validation size up
    assert [e.reference for e in two.test] == list(raw["validation"]["summary"])
    assert sorted(e.reference for e in two.train + two.validation) == sorted(raw["train"]["summary"])


def test_files_parquet_with_column_mapping_and_string_labels(tmp_path, text_tok):
    rows = [json.loads(line) for line in Path(RTE["train"]).read_text().splitlines()]
    table = datasets.Dataset.from_list(
        [{"premise": r["sentence1"], "claim": r["sentence2"], "gold": "yes" if r["label"] == 0 else "no"} for r in rows]
    )
    table.to_parquet(tmp_path / "train.parquet")
    spec = DataSpec(
        task="files",
        kind="classification",
        data_files={"train": str(tmp_path / "train.parquet")},
        columns={"text": "premise", "text_pair": "claim", "label": "gold"},
        validation_fraction=0.3,
    )
    task = load_task(spec, text_tok)
    assert task.label_names == ["no", "yes"]  # sorted distinct strings
    assert (len(task.train), len(task.validation), task.test) == (7, 3, [])
    yes = text_tok("yes", add_special_tokens=False)["input_ids"]
    assert all((e.answer_ids == yes) == (e.reference == 1) for e in task.train + task.validation)
    with pytest.raises(ValueError, match="empty"):
        evaluate(LookupLM(torch.zeros(len(text_tok), len(text_tok))), task, "test", text_tok, spec)


SPLITS = ("train", "validation", "test")


def test_truncation_keeps_separator_and_answer(text_tok):
    full = load_task(DataSpec(task="generation", data_files=SAMSUM), text_tok)
    short = load_task(DataSpec(task="generation", data_files=SAMSUM, max_length=24), text_tok)
    for whole, cut in zip(full.train, short.train):
        assert len(cut.prompt_ids) + len(cut.answer_ids) <= 24
        if len(whole.answer_ids) < 24:  # the prompt loses tokens from its left end
            assert cut.answer_ids == whole.answer_ids
            assert cut.prompt_ids == whole.prompt_ids[-(24 - len(whole.answer_ids)) :]
            assert cut.prompt_ids[-1] == text_tok.sep_token_id
    tiny = load_task(DataSpec(task="generation", data_files=SAMSUM, max_length=4), text_tok)
    assert all(e.prompt_ids == [text_tok.sep_token_id] and len(e.answer_ids) == 3 for e in tiny.train)


def test_examples_longer_than_max_length_are_counted_or_refused(text_tok):
    """Never dropped: truncated and counted per split (``cut`` says how many tokens went), or refused in one line
    that names the field and the counts."""
    full = load_task(DataSpec(task="generation", data_files=SAMSUM), text_tok)
    lengths = {split: [len(e.prompt_ids) + len(e.answer_ids) for e in getattr(full, split)] for split in SPLITS}
    limit = sorted(lengths["train"])[len(lengths["train"]) // 2]  # about half of train is longer
    expected = {split: sum(length > limit for length in values) for split, values in lengths.items()}
    assert 0 < expected["train"] < len(full.train)
    short = load_task(DataSpec(task="generation", data_files=SAMSUM, max_length=limit), text_tok)
    assert short.too_long() == expected and full.too_long() == dict.fromkeys(SPLITS, 0)
    assert [len(e.train) for e in (full, short)] == [len(full.train)] * 2  # none dropped
    for whole, cut in zip(full.train, short.train):
        assert cut.cut == max(0, len(whole.prompt_ids) + len(whole.answer_ids) - limit)
    with pytest.raises(ValueError) as refused:
        load_task(DataSpec(task="generation", data_files=SAMSUM, max_length=limit, too_long="refuse"), text_tok)
    message = str(refused.value)
    assert message.startswith("data.too_long: refuse, and ") and "\n" not in message
    assert f"{expected['train']} of {len(full.train)} train" in message
    assert (
        f"longer than data.max_length {limit} (the longest {max(max(v) for v in lengths.values())} tokens)" in message
    )


def test_label_strings_need_distinct_first_tokens(text_tok):
    with pytest.raises(ValueError, match="distinct tokens"):
        load_task(DataSpec(task="glue", subset="rte", data_files=RTE, label_names=["the cat", "the mat"]), text_tok)


# ---------------------------------------------------------------------------------------------------------------
# Metrics on models whose predictions are known


def classification_case(tmp_path, text_tok, rows, scores):
    """A task over ``rows`` (word, label) and a LookupLM whose logits after "<word> ###" are ``scores[word]``."""
    data_files = jsonl(tmp_path / "cls.jsonl", [{"text": word, "label": label} for word, label in rows])
    vocab = len(text_tok)
    table = torch.zeros(vocab, vocab)
    for word, logits in scores.items():
        for token, value in logits.items():
            table[text_tok.convert_tokens_to_ids(word), text_tok.convert_tokens_to_ids(token)] = value
    return data_files, LookupLM(table)


@pytest.mark.parametrize(
    ("scoring", "expected"),
    [
        # strict: predictions 1 1 1 0 0 1 for gold 1 1 0 0 1 1 -> TP 3, FP 1, TN 1, FN 1
        ("strict", {"accuracy": 4 / 6, "f1": 0.75, "matthews": (3 * 1 - 1 * 1) / math.sqrt(4 * 4 * 2 * 2)}),
        # official: "gamma" predicts "cat" (no label) and is dropped -> 1 1 1 0 0 vs 1 1 0 0 1: TP 2, FP 1, TN 1, FN 1
        ("official", {"accuracy": 3 / 5, "f1": 2 / 3, "matthews": (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)}),
    ],
)
def test_classification_metrics_by_hand(tmp_path, text_tok, scoring, expected):
    rows = [("alpha", 1), ("alpha", 1), ("alpha", 0), ("beta", 0), ("beta", 1), ("gamma", 1)]
    scores = {"alpha": {"1": 5.0}, "beta": {"0": 5.0}, "gamma": {"cat": 5.0, "1": 3.0, "0": 1.0}}
    data_files, model = classification_case(tmp_path, text_tok, rows, scores)
    spec = DataSpec(task="files", kind="classification", data_files=data_files, scoring=scoring)
    task = load_task(spec, text_tok)
    model.train()
    metrics = evaluate(model, task, "test", text_tok, spec, batch_size=4)
    assert model.training  # the mode is restored

    v = len(text_tok)
    lse = math.log(math.exp(5) + v - 1)  # alpha and beta rows: one logit 5, the rest 0
    lse_gamma = math.log(math.exp(5) + math.exp(3) + math.exp(1) + v - 3)
    loss = (2 * (lse - 5) + lse + lse + (lse - 5) + (lse_gamma - 3)) / 6
    assert set(metrics) == set(task.metric_names)
    assert metrics == pytest.approx({**expected, "out_of_label": 1 / 6, "loss": loss})


def test_three_classes_use_macro_f1(tmp_path, text_tok):
    rows = [("alpha", 0), ("beta", 1), ("gamma", 2)]
    scores = {"alpha": {"0": 5.0}, "beta": {"1": 5.0}, "gamma": {"1": 5.0}}
    data_files, model = classification_case(tmp_path, text_tok, rows, scores)
    spec = DataSpec(task="files", kind="classification", data_files=data_files)
    metrics = evaluate(model, load_task(spec, text_tok), "test", text_tok, spec)
    # per-class F1: 1, 2/3 (P 1/2, R 1), 0. Matthews: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    # with c=2, s=3, predicted counts (1, 2, 0), true counts (1, 1, 1).
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics["matthews"] == pytest.approx((2 * 3 - 3) / math.sqrt((9 - 5) * (9 - 3)))
    assert metrics["out_of_label"] == 0.0


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_metrics_by_hand(tmp_path, text_tok, num_beams):
    references = ["the cat sat on the mat", "the cat sat on a soft mat"]
    data_files = jsonl(tmp_path / "gen.jsonl", [{"text": t, "target": r} for t, r in zip(["one", "two"], references)])
    spec = DataSpec(task="files", kind="generation", data_files=data_files, num_beams=num_beams, max_new_tokens=10)
    task = load_task(spec, text_tok)
    vocab = len(text_tok)
    # generate() sizes a (here unused) cache from num_hidden_layers.
    config = FixedConfig(vocab_size=vocab, num_hidden_layers=1, eos_token_id=text_tok.eos_token_id)
    model = FixedContinuationLM(
        config, text_tok.sep_token_id, text_tok(references[0], add_special_tokens=False)["input_ids"]
    )
    metrics = evaluate(model, task, "test", text_tok, spec)

    # Both predictions are "the cat sat on the mat" (6 words). Against "the cat sat on a soft mat" (7 words):
    # unigram overlap 5 (F = 2*5/(6+7)), bigram overlap 3 of 5 vs 6 (F = 2*3/(5+6)), LCS "the cat sat on mat"
    # (F = 2*5/(6+7)). Corpus BLEU: n-gram matches 11/12, 8/10, 6/8, 4/6 for n = 1..4; hypotheses 12 words,
    # references 13, so the brevity penalty is exp(1 - 13/12).
    # Loss: 7 + 8 answer tokens (words + eos), each predicted with logit 10 (the others 0); the script misses
    # 3 of the second answer ("a", "soft", "mat" where it says "the", "mat", eos).
    lse = math.log(math.exp(10) + vocab - 1)
    assert metrics == pytest.approx(
        {
            "exact_match": 0.5,
            "rouge1": (1 + 10 / 13) / 2,
            "rouge2": (1 + 6 / 11) / 2,
            "rougeL": (1 + 10 / 13) / 2,
            "bleu": math.exp(1 - 13 / 12) * (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25,
            "loss": (12 * (lse - 10) + 3 * lse) / 15,
        }
    )


def test_tiny_mamba_evaluates_both_kinds(digits_tok, text_tok):
    spec = DataSpec(max_eval_samples=8)
    task = load_task(spec, digits_tok)
    model = tiny_mamba(len(digits_tok))
    for scoring in ("strict", "official"):
        metrics = evaluate(
            model, task, "validation", digits_tok, spec.model_copy(update={"scoring": scoring}), batch_size=3
        )
        assert set(metrics) == set(task.metric_names)
        assert all(math.isfinite(value) for value in metrics.values())
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["out_of_label"] <= 1

    spec = DataSpec(task="generation", data_files=SAMSUM, max_eval_samples=2, max_new_tokens=4, num_beams=2)
    task = load_task(spec, text_tok)
    metrics = evaluate(tiny_mamba(len(text_tok)), task, "test", text_tok, spec)
    assert set(metrics) == set(task.metric_names)
    assert all(math.isfinite(value) for value in metrics.values())
