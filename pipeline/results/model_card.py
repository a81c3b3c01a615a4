"""The model card of an export (``README.md``): what the adapter is, how well it did, what it reads and answers, and
how to load it; and the task's prompt format the card and the registered pipeline share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.results.arms import value_label
from pipeline.results.outcomes import metric_on_test
from pipeline.results.tracking import CHAMPION_ALIAS
from pipeline.spec.job import DataSpec, JobSpec
from pipeline.storage.layout import MERGED_DIR
from pipeline.storage.paths import StoragePath
from pipeline.tasks.formatting import SEP
from pipeline.tasks.registry import get_task

POSITION_KEYS = ("step", "epoch")  # where in training the last report was made


def registry_name(spec: JobSpec) -> str:
    """The name the export is registered under in MLflow's model registry."""
    return spec.export.registered_model_name or spec.name


def base_model_name(spec: JobSpec) -> str:
    """The base as a person names it: ``builtin digits``, the hub name or path, or ``fresh mamba2 (...)``."""
    model = spec.model
    if model.builtin is not None:
        return f"builtin {model.builtin}"
    if model.architecture is not None:
        return f"fresh {model.architecture} (random weights, seed 0; config {json.dumps(model.config, sort_keys=True)})"
    return str(model.name_or_path)


def prompt_format(data: DataSpec) -> str:
    """What the model reads: ``<instruction><text>###`` (a pair: ``...<text>###<text_pair>###``)."""
    pair = f"<text_pair>{SEP}" if "text_pair" in get_task(data.task).column_roles(data) else ""
    return f"{data.instruction}<text>{SEP}{pair}"


def example_prompt(data: DataSpec) -> str:
    """A prompt to show and to try: one of the task's test inputs where it has one to show (the digits task's first
    test image), else the format itself."""
    example = get_task(data.task).example
    return prompt_format(data) if example is None else f"{data.instruction}{example(data)}{SEP}"


def generates_text(data: DataSpec) -> bool:
    """Whether the task's answers are free text (generation) rather than class labels."""
    return get_task(data.task).kind_of(data) == "generation"


def answer_format(spec: JobSpec) -> str:
    if generates_text(spec.data):
        return "the target text, then the tokenizer's end-of-sequence token"
    names = spec.data.label_names
    return f"one of {', '.join(names)}" if names else 'the class index as text ("0", "1", ...)'


def answer_tokens(spec: JobSpec) -> int:
    """How many tokens the registered pipeline generates by default: the task's answer length for generation,
    one (the label's first token, which classification scores) otherwise."""
    return spec.data.max_new_tokens if generates_text(spec.data) else 1


def model_card(
    spec: JobSpec,
    record: Mapping[str, Any],
    adapter_config: Mapping[str, Any],
    out: StoragePath,
    merged: bool,
    registered_as: str | None,
) -> str:
    """``README.md``: what the adapter is, how well it did, what it reads and answers, and how to use it
    (``registered_as``: the MLflow registry name it is being registered under)."""
    name = registry_name(spec)
    lines = [
        *card_summary(spec, record, adapter_config, name),
        "## Prompt format",
        "",
        f"The model reads `{prompt_format(spec.data)}` and answers {answer_format(spec)}. For example (the "
        "snippets below use it):",
        "",
        "```python",
        f"PROMPT = {json.dumps(example_prompt(spec.data))}",
        "```",
        "",
        "## Usage",
        "",
        *usage(spec, adapter_config, out, merged, registered_as),
    ]
    return "\n".join(lines) + "\n"


def card_summary(spec: JobSpec, record: Mapping[str, Any], adapter_config: Mapping[str, Any], name: str) -> list[str]:
    """The card's metadata block and what the adapter is and scored."""
    metric, metrics = record["metric"], record["metrics"]
    test = metric_on_test(metric)
    others = [f"{key} {value:.4g}" for key, value in sorted(metrics.items()) if key.startswith("test/") and key != test]
    test_score = (
        f"{test} **{metrics[test]:.4g}**" + (f" ({', '.join(others)})" if others else "") if test in metrics else None
    )
    hyperparameters = ", ".join(f"`{key}` = {value_label(value)}" for key, value in record["hyperparameters"].items())
    return [
        "---",  # the metadata block of a Hugging Face model card
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [sdtune, {adapter_config['method']}, {adapter_config['model_type']}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A `{adapter_config['method']}` adapter (sdtune {adapter_config['sdtune_version']}), the best trial of the "
        f"sweep `{spec.name}`.",
        "",
        f"- base model: {base_model_name(spec)}",
        f"- task: `{spec.data.task}`, {get_task(spec.data.task).summary}",
        f"- method: {adapter_config['description']}",
        f"- trainable parameters: {adapter_config['num_trainable_parameters']:,}",
        f"- test score: {test_score}"
        if test_score
        else "- test score: none (no test split, or the trial stopped early)",
        f"- {metric} (validation, which picked it): {record['value']:.4g} ({record['mode']}), trial "
        f"`{record['trial_id']}`" + "".join(f", {key} {metrics[key]}" for key in POSITION_KEYS if key in metrics),
        f"- hyperparameters of the trial: {hyperparameters or 'none searched'}",
        "",
    ]


def usage(
    spec: JobSpec, adapter_config: Mapping[str, Any], out: StoragePath, merged: bool, registered_as: str | None
) -> list[str]:
    """How to load it: from the MLflow registry, merged with plain transformers, and on its base with ``sdt``."""
    builtin = spec.model.builtin is not None
    load_base = (
        ["from pipeline.tasks.digits import SHIPPED_BASE  # the builtin digits base ships with sdtune", "",
         "base = AutoModelForCausalLM.from_pretrained(SHIPPED_BASE)"]
        if builtin else [f'base = AutoModelForCausalLM.from_pretrained("{adapter_config["base_model"]}")']
    )  # fmt: skip
    lines: list[str] = []
    if registered_as:
        lines += [
            "From the MLflow registry (`MLFLOW_TRACKING_URI` set to the sweep's store), a transformers pipeline:",
            "",
            "```python",
            "import mlflow",
            "",
            f'generator = mlflow.transformers.load_model("models:/{registered_as}@{CHAMPION_ALIAS}")',
            "print(generator(PROMPT, max_new_tokens=1, do_sample=False, return_full_text=False))",
            "```",
            "",
        ]
    if merged:
        lines += [
            f"`{MERGED_DIR}/` holds the adapter merged into the base weights, a plain transformers model:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{out / MERGED_DIR}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out / MERGED_DIR}")',
            'ids = tokenizer(PROMPT, return_tensors="pt").input_ids',
            "answer = tokenizer.decode(model.generate(ids, max_new_tokens=1, do_sample=False)[0, ids.shape[1]:])",
            "```",
            "",
        ]
    lines += [
        "The adapter on its base, with sdtune's `sdt`:",
        "",
        "```python",
        "import sdt",
        "from transformers import AutoModelForCausalLM",
        *load_base,
        f'model = sdt.load(base, "{out}").model',
        "```",
    ]
    return lines
