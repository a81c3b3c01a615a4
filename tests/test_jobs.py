"""The ready-made sweeps in jobs/: every spec loads, names are unique, and the expected ones exist.

Spec checks only: no Ray, no model or data loading.
"""

import math
from pathlib import Path

import pytest

from pipeline.spec.job import JobSpec, load_job

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
JOB_FILES = sorted(JOBS_DIR.glob("*.yaml"))
EXPECTED = (
    "rte-mamba130m.yaml",
    "samsum-mamba1.4b.yaml",
    "spider-mamba1.4b.yaml",
    "jamba.yaml",
    "cluster-multigpu.yaml",
    "paper-digits.yaml",
    "mamba2-130m.yaml",
    "mamba2-tiny.yaml",
)


def grid_trials(spec: JobSpec) -> int:
    """Trials of a grid / random sweep: the product of the grid sizes, times num_samples."""
    sizes = [len(domain.grid) for domain in spec.search.space.values() if domain.kind == "grid"]
    return math.prod(sizes) * spec.search.num_samples


def test_expected_jobs_exist():
    missing = [name for name in EXPECTED if not (JOBS_DIR / name).is_file()]
    assert not missing, f"missing job specs in {JOBS_DIR}: {missing}"


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda path: path.name)
def test_job_loads(path):
    load_job(path)  # raises JobSpecError naming the field if the spec is invalid
    assert path.read_text().startswith("#"), "a job starts with comments saying what it is for"


def test_job_names_are_unique():
    names = {}
    for path in JOB_FILES:
        names.setdefault(load_job(path).name, []).append(path.name)
    duplicates = {name: files for name, files in names.items() if len(files) > 1}
    assert not duplicates, f"jobs sharing a name (and so a sweep directory): {duplicates}"


def test_readme_lists_every_job():
    readme = (JOBS_DIR / "README.md").read_text()
    unlisted = [path.name for path in JOB_FILES if f"`{path.name}`" not in readme]
    assert not unlisted, f"jobs/README.md does not list {unlisted}"


def test_method_grids_have_distinct_arms():
    grids = {path.name: load_job(path).search.space.get("method") for path in JOB_FILES}
    grids = {name: domain.grid for name, domain in grids.items() if domain is not None and domain.kind == "grid"}
    assert "quickstart.yaml" in grids and "paper-digits.yaml" in grids
    for name, grid in grids.items():
        arms = [tuple(sorted((key, str(value)) for key, value in arm.items())) for arm in grid]
        assert len(set(arms)) == len(arms), name


def test_paper_digits_is_a_fixed_budget_comparison():
    spec = load_job(JOBS_DIR / "paper-digits.yaml")
    assert spec.model.builtin == "digits" and spec.data.task == "digits"
    assert spec.search.scheduler == "fifo" and spec.search.algorithm == "grid"
    assert {arm["name"] for arm in spec.search.space["method"].grid} == {"sdlora", "sdt", "lora", "full"}
    assert spec.search.space["training.seed"].grid == [0, 1, 2]
    assert grid_trials(spec) <= 72


def test_documented_overrides_validate():
    # The follow-up sweep that paper-digits.yaml documents, and its CPU variant.
    spec = load_job(
        JOBS_DIR / "paper-digits.yaml",
        [
            "name=paper-digits-full-lr1e-3",
            "search.space.method={grid: [{name: full}]}",
            "search.space.training.lr={grid: [1.0e-3]}",
        ],
    )
    assert grid_trials(spec) == 3
    cpu = load_job(
        JOBS_DIR / "paper-digits.yaml",
        ["resources.use_gpu=false", "resources.max_concurrent_trials=2", "resources.cpus_per_worker=0.5"],
    )
    assert cpu.resources.use_gpu is False
    jamba = load_job(
        JOBS_DIR / "jamba.yaml",
        [
            "model.name_or_path=ai21labs/AI21-Jamba-Mini-1.6",
            "data.max_train_samples=null",
            "data.max_eval_samples=null",
        ],
    )
    assert jamba.data.max_train_samples is None


def test_the_mamba2_jobs_leave_the_sdt_counts_to_the_default_rule():
    """Their SDLoRA arm sets no count, so it trains what the head-aware defaults give (docs/mamba2.md); the LoRA
    arms name modules a Mamba2Mixer has."""
    for name in ("mamba2-130m.yaml", "mamba2-tiny.yaml"):
        spec = load_job(JOBS_DIR / name)
        arms = spec.search.space["method"].grid
        [sdlora] = [arm for arm in arms if arm["name"] == "sdlora"]
        assert not {"channels_frozen", "states_frozen", "inputs_frozen"} & set(sdlora), name
        assert all(set(arm.get("lora_targets", [])) <= {"in_proj", "out_proj"} for arm in arms), name
