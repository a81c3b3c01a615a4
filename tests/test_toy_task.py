"""A task added the way a user adds one: a module outside pipeline/ that registers it, named in the job spec's
``imports``. `sdtune sweep` validates it, trains and scores its trials in Ray's processes, reports and exports it
like a built-in task."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from processes import failure, plugin_env, sdtune

from pipeline.spec.job import JobSpecError, parse_job
from pipeline.tasks.registry import TASKS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
MODULE = "sdtune_toy_task"

# Four pixel values in, the largest out: a generation task over the digits tokenizer's words, whose headline is
# exact match. Built from the registry's pieces and the shared split logic, as a task in pipeline/tasks/builtin/ is.
TOY_TASK = """
import numpy as np

from pipeline.tasks.registry import Task, register_task
from pipeline.tasks.splits import carved_train_rows, pool_splits, table

POOL, TEST, LENGTH = 64, 16, 4


def splits(data):
    values = np.random.default_rng(data.split_seed).integers(0, 17, size=(POOL + TEST, LENGTH)).tolist()
    texts = [" ".join(map(str, row)) + " " for row in values]
    rows = table({"text": texts, "target": [str(max(row)) for row in values]})
    return pool_splits(rows, POOL, data.validation_fraction, data.split_seed)


register_task(Task(
    name="largest",
    summary="the largest of four pixel values",
    kind="generation",
    splits=splits,
    headline=lambda data: "exact_match",
    train_rows=lambda data: carved_train_rows(POOL, data.validation_fraction),
))
"""


def toy_job(output: Path) -> dict:
    """The quickstart on the toy task: two trials (two learning rates) of a few steps, one evaluation each."""
    job = yaml.safe_load(QUICKSTART.read_text())
    job.update(name="largest", imports=[MODULE], output_dir=str(output))
    job["data"] = {"task": "largest", "max_new_tokens": 2}  # one pixel value and the end of the text
    job["method"]["warmup_steps"] = 2
    job["training"].update(epochs=1, max_steps=3, batch_size=8)
    job["search"] = {
        "metric": "eval/exact_match",  # a generation metric: preflight asks the registry what the task reports
        "mode": "max",
        "scheduler": "fifo",
        "space": {"training.lr": {"grid": [1.0e-2, 3.0e-2]}},
    }
    job["export"] = {"merge": False, "register_model": False}
    return job


def test_a_task_registered_through_the_specs_imports_is_swept_like_a_builtin(tmp_path, digits_cache):
    assert "largest" not in TASKS  # nothing in pipeline/ knows it
    (tmp_path / f"{MODULE}.py").write_text(TOY_TASK)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(toy_job(tmp_path / "runs")))
    env = plugin_env(digits_cache, tmp_path)
    result = sdtune("sweep", str(job), env=env)
    assert result.returncode == 0, failure(result)
    assert "trials: 2 (0 failed)" in result.stdout

    sweep_dir = tmp_path / "runs" / "largest"
    with (sweep_dir / "report" / "trials.csv").open() as file:
        trials = list(csv.DictReader(file))
    assert [trial["status"] for trial in trials] == ["TERMINATED"] * 2
    for trial in trials:  # the report's columns are the task's headline metric, on validation and on test
        assert 0 <= float(trial["eval/exact_match"]) <= 1 and 0 <= float(trial["test/exact_match"]) <= 1, trial

    record = json.loads((sweep_dir / "export" / "trial.json").read_text())
    assert record["metric"] == "eval/exact_match"
    for name in ("exact_match", "rouge1", "bleu"):  # scored as a generation task, on validation and on test
        assert 0 <= record["metrics"][f"eval/{name}"] <= 1 and 0 <= record["metrics"][f"test/{name}"] <= 1
    card = (sweep_dir / "export" / "README.md").read_text()
    assert "- task: `largest`, the largest of four pixel values" in card and "answers the target text" in card


def test_an_unknown_task_is_one_line_naming_data_task_and_the_registered_ones():
    with pytest.raises(JobSpecError) as raised:
        parse_job({"name": "x", "model": {"builtin": "digits"}, "data": {"task": "largest"}})
    assert str(raised.value) == f"data.task: unknown task 'largest'; tasks are {', '.join(TASKS)}"
    assert list(TASKS) == ["digits", "synthetic", "glue", "generation", "files"]  # the shipped ones, in their order
