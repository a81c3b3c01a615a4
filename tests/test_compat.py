"""Every private or unstable upstream API that sdt and the pipeline touch (sdt/compat/, pipeline/compat/), exercised
against the installed upstream: where an upstream moves one, its test fails with a ``CompatError`` naming the
upstream, its installed version and the internal. The last tests keep such uses out of the rest of the code."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import one_rank_process_group
from ray import tune
from ray.tune.experiment import Experiment, Trial
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from pipeline.compat import deepspeed as deepspeed_compat
from pipeline.compat import ray as ray_compat
from pipeline.compat import transformers as transformers_compat
from pipeline.compat import tune as tune_compat
from pipeline.trial.models import KERNEL_FUNCTIONS
from sdt.compat import CompatError, require
from sdt.compat import transformers as sdt_transformers
from sdt.compat.deepspeed import partitioned_by_zero3
from sdt.compat.mamba_ssm import load_cuda_kernels
from sdt.fused import mamba1_mixers

ROOT = Path(__file__).resolve().parents[1]


def test_a_compat_error_names_the_upstream_its_version_and_the_internal():
    error = CompatError("ray", "ray._private.state.state", "has no _connect_and_get_accessor")
    assert str(error) == f"ray {ray.__version__}: ray._private.state.state has no _connect_and_get_accessor"
    assert str(CompatError("no-such-dist", "x", "moved")) == "no-such-dist (not installed): x moved"


# ---------------------------------------------------------------------------------------------------------------
# Ray


@pytest.mark.parametrize("name", sorted(ray_compat.PRIVATE_ENVIRONMENT))
def test_ray_reads_the_environment_variables_sdtune_sets(name):
    ray_compat.check_environment_variable(name)


def test_ray_knows_the_system_config_key_sdtune_sets():
    ray_compat.check_system_config_key()


@pytest.fixture(scope="module")
def local_ray():
    """A one-CPU Ray instance started as a sweep starts its own (the startup-concurrency key, worker output sent
    to the driver)."""
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=True,
             **ray_compat.startup_concurrency(os.cpu_count() or 1))  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


def test_a_placement_groups_record_says_when_it_was_placed(local_ray):
    from ray.util.placement_group import placement_group, remove_placement_group

    asked = time.time()
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready())
    try:
        assert asked <= ray_compat.placement_group_placed_at(group.id) <= time.time()
    finally:
        remove_placement_group(group)


@ray.remote(num_cpus=0)
def say(line: str) -> None:
    print(line, flush=True)


def test_workers_output_leaves_the_console_for_a_handler_of_sdtunes(local_ray):
    received, line = threading.Event(), "sdtune compat: a worker's line"

    def handler(data) -> None:
        if line in data.get("lines", []):
            received.set()

    ray_compat.remove_console_worker_output()
    ray_compat.add_worker_output_handler("sdtune_compat_test", handler)
    try:
        ray.get(say.remote(line))
        assert received.wait(timeout=60), "the worker's line never reached the handler"
    finally:
        ray_compat.worker_output_dispatcher().remove_handler("sdtune_compat_test")
    with pytest.raises(CompatError, match="ray_print_logs"):  # gone now: said, never silently ignored
        ray_compat.remove_console_worker_output()


@ray.remote(num_cpus=0, max_retries=0)
def die() -> None:
    os._exit(1)


def test_the_clusters_error_messages_leave_the_console_for_a_handler_of_sdtunes(local_ray, monkeypatch, capfd):
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # Ray's own, after the test
    received = threading.Event()

    def handler(data) -> None:
        if any("A worker died" in line for line in data.get("lines", [])):
            received.set()

    ray_compat.route_error_messages(handler, keep_printing=False)
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(die.remote())
    assert received.wait(timeout=60), "Ray's message of the dead worker never reached the handler"
    assert "A worker died" not in capfd.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Ray Tune and Optuna


def experiment(tmp_path: Path, samples: int) -> Experiment:
    return Experiment("compat", lambda config: None, config={"training.lr": tune.loguniform(1e-4, 1e-2)},
                      num_samples=samples, storage_path=str(tmp_path / "storage"))  # fmt: skip


def test_tunes_experiment_state_is_read_as_tune_writes_it(tmp_path):
    """Trials serialized by Tune itself, in the file Tune's controller names and writes (``trial_data``)."""
    from ray.tune.execution.tune_controller import TuneController

    written = {"a_00000": ("TERMINATED", {"eval/accuracy": 0.5}), "a_00001": ("RUNNING", {})}
    trials = []
    for trial_id, (status, last_result) in written.items():
        trial = Trial("compat", config={"training": {"lr": 0.01}}, trial_id=trial_id, stub=True)
        trial.set_status(status)
        trial.run_metadata.last_result = last_result
        trials.append(trial.get_json_state())
    name = TuneController.CKPT_FILE_TMPL.format("2026-12-07_12-00-00")
    assert Path(name).match(tune_compat.EXPERIMENT_STATE), name
    (tmp_path / name).write_text(json.dumps({"trial_data": trials}))
    stored = tune_compat.stored_trials(tmp_path)
    assert {trial_id: (t.status, t.last_result) for trial_id, t in stored.items()} == written
    assert stored["a_00000"].config == {"training/lr": 0.01} and stored["a_00000"].finished
    assert not stored["a_00001"].finished


def test_a_failed_trials_error_and_checkpoint_are_read_as_the_callbacks_read_them(local_ray, tmp_path):
    seen = {}

    def fails(config) -> None:  # defined here, so that Ray ships it by value to a worker without the tests' path
        raise ValueError("sdtune compat: the trial's own error")

    class Reader(tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            seen["error"] = tune_compat.trial_error(trial)
            seen["checkpoint"] = tune_compat.trial_checkpoint_path(trial)

    run_config = tune.RunConfig(storage_path=str(tmp_path), callbacks=[Reader()], verbose=0)
    tune.Tuner(fails, run_config=run_config).fit()
    assert "ValueError: sdtune compat: the trial's own error" in seen["error"]
    assert seen["checkpoint"] is None  # it reported no checkpoint


def test_the_grid_searchers_running_and_made_trials_are_set(tmp_path):
    generator = BasicVariantGenerator(max_concurrent=1)
    generator.add_configurations([experiment(tmp_path, 3)])
    first = generator.next_trial()
    assert generator.next_trial() is None  # one running: the limit
    prefix = first.trial_id.removesuffix("00000")
    tune_compat.set_live_trials(generator, set())
    tune_compat.skip_made_trials(generator, {f"{prefix}00001"})
    assert generator.next_trial().trial_id == f"{prefix}00002"


def test_optunas_searcher_is_told_the_trials_made_running_and_ended(tmp_path):
    optuna = OptunaSearch()
    limiter = ConcurrencyLimiter(optuna, max_concurrent=1)
    searcher = SearchGenerator(limiter)
    searcher.set_search_properties("eval/accuracy", "max", {"training.lr": tune.loguniform(1e-4, 1e-2)})
    searcher.add_configurations([experiment(tmp_path, 3)])
    first = searcher.next_trial()
    assert tune_compat.optuna_has_trial(optuna, first.trial_id) and not tune_compat.optuna_has_trial(optuna, "x")
    assert searcher.next_trial() is None  # one running: the limit
    tune_compat.set_limiter_live_trials(limiter, set())
    tune_compat.enqueue_in_optuna(optuna, {"training.lr": 3e-3, "training.epochs": 4})
    second = searcher.next_trial()
    assert second.config == {"training.lr": 3e-3}  # Optuna's next trial is the one enqueued
    searcher.on_trial_complete(second.trial_id, result={"eval/accuracy": 0.7, "training_iteration": 1})
    assert tune_compat.optuna_completed(optuna, second.trial_id)
    assert not tune_compat.optuna_completed(optuna, first.trial_id)
    told = [trial.value for trial in tune_compat.optuna_study(optuna).get_trials()]
    assert told == [None, 0.7]
    tune_compat.count_made_trials(searcher, 3)
    assert searcher.is_finished()


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed


@pytest.fixture
def deepspeed_engine(monkeypatch):
    """A stage-0 DeepSpeed engine on one rank (gloo), as a trial's one worker makes it."""
    import deepspeed

    deepspeed_compat.skip_shared_memory_allreduce_build()
    with one_rank_process_group(monkeypatch):
        model = torch.nn.Linear(4, 1)
        params = list(model.parameters())
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.AdamW(params),
                                          config={"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
                                                  "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
                                                  "zero_force_ds_cpu_optimizer": False})  # fmt: skip
        yield engine
        engine.destroy()


def test_deepspeed_builds_no_shared_memory_allreduce_once_told():
    from deepspeed.comm.torch import build_shm_op

    deepspeed_compat.skip_shared_memory_allreduce_build()
    assert build_shm_op() is None  # where the accelerator has the op, it was not built


def all_reduces(action) -> set[str]:
    """The all-reduce operations that ``action()`` ran, as torch's profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        action()
    return {event.name for event in profile.events() if "all_reduce" in event.name or "allreduce" in event.name}


def test_a_stage0_engine_skips_its_allreduce_and_clips_with_the_function_given(deepspeed_engine):
    engine = deepspeed_engine
    tokens = torch.ones(1, 4, device=engine.device)
    assert all_reduces(lambda: engine.backward(engine(tokens).sum()))  # the probe sees DeepSpeed's all-reduce
    engine.step()
    clipped = []
    deepspeed_compat.skip_backward_allreduce(engine)
    deepspeed_compat.replace_gradient_clipping(engine, lambda: clipped.append(engine.global_steps))
    assert not all_reduces(lambda: engine.backward(engine(tokens).sum()))
    engine.step()
    assert clipped == [1]


def test_zero3s_partitioned_parameters_are_told_apart(monkeypatch):
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    with one_rank_process_group(monkeypatch):
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        with deepspeed.zero.Init(config_dict_or_path=config):
            partitioned = torch.nn.Linear(4, 4)
    plain = torch.nn.Linear(4, 4)
    assert is_zero_param(partitioned.weight) and partitioned_by_zero3(partitioned.weight)
    assert not is_zero_param(plain.weight) and not partitioned_by_zero3(plain.weight)


# ---------------------------------------------------------------------------------------------------------------
# transformers (and accelerate's hooks, and the `kernels` package's function modules)


@pytest.mark.parametrize("model_type, name", [(t, name) for t, names in KERNEL_FUNCTIONS.items() for name in names])
def test_transformers_kernel_entry_points_say_which_implementation_they_run(model_type, name):
    implementation = transformers_compat.kernel_implementation(model_type, name)
    assert callable(implementation)
    assert implementation.__module__.split(".")[0] in ("transformers", "mamba_ssm", "causal_conv1d")


def test_transformers_kernel_hints_come_from_the_logger_the_console_quiets():
    where = transformers_compat.KERNEL_HINTS_LOGGER
    try:
        module = importlib.import_module(where)
    except ImportError as error:
        pytest.fail(str(CompatError("transformers", where, f"is gone ({error})")))
    assert require(module, "logger", "transformers", where).name == where


def test_trainers_checkpoint_loaders_are_replaced_and_given_back(load_base, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=load_base("mamba"), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    own = sdt_transformers.checkpoint_loaders(trainer)

    def load_from_checkpoint(resume_from_checkpoint, model=None) -> None:
        pass

    def load_best_model() -> None:
        pass

    with sdt_transformers.checkpoint_loaders_replaced(trainer, load_from_checkpoint, load_best_model):
        assert sdt_transformers.checkpoint_loaders(trainer) == (load_from_checkpoint, load_best_model)
    assert sdt_transformers.checkpoint_loaders(trainer) == own


@pytest.mark.parametrize("arch", ["mamba", "jamba"])
def test_a_mamba_mixers_forward_takes_the_arguments_the_fused_path_knows(load_base, arch):
    """A forward argument the fused path does not know sends every training step to transformers' path."""
    mixer = mamba1_mixers(load_base(arch))[0][1]
    parameters = inspect.signature(type(mixer).forward).parameters.values()
    named = {p.name for p in parameters if p.kind is not p.VAR_KEYWORD} - {"self"}
    where = f"{type(mixer).__module__}.{type(mixer).__name__}.forward"
    assert named <= sdt_transformers.MIXER_ARGUMENTS, str(CompatError("transformers", where, f"takes {named}"))
    [cache] = named & {"cache", "cache_params"}
    assert sdt_transformers.mixer_cache({cache: "the cache"}) == "the cache"


def test_a_quantized_models_mixers_are_told_apart(load_base):
    import transformers.quantizers.base

    model = load_base("mamba")
    mixer = mamba1_mixers(model)[0][1]
    assert not sdt_transformers.is_quantized(mixer)
    require(transformers.quantizers.base, "_assign_is_quantized", "transformers", "transformers.quantizers.base")(model)
    assert sdt_transformers.is_quantized(mixer)


def test_a_mixer_with_accelerate_hooks_is_told_apart(load_base):
    hooks = pytest.importorskip("accelerate.hooks")
    mixer = mamba1_mixers(load_base("mamba"))[0][1]
    assert not sdt_transformers.has_accelerate_hooks(mixer)
    hooks.add_hook_to_module(mixer.x_proj, hooks.ModelHook())
    assert sdt_transformers.has_accelerate_hooks(mixer)


# ---------------------------------------------------------------------------------------------------------------
# mamba-ssm / causal-conv1d (what sdt calls them with: tests/test_fused_cuda.py)


@pytest.mark.cuda
def test_mamba_ssm_and_causal_conv1d_entry_points_resolve():
    kernels, reason = load_cuda_kernels()
    assert kernels is not None, reason


# ---------------------------------------------------------------------------------------------------------------
# No upstream internal outside the compat modules

COMPAT_MODULES = (ROOT / "sdt" / "compat", ROOT / "pipeline" / "compat")
# The names of every upstream internal found in sdt/ and pipeline/, by upstream: as an attribute, a name, an
# import, a keyword or inside a string (docstrings and comments may name them).
INTERNALS = {
    "ray": ("_private", "_internal", "gcs_pb2", "_connect_and_get_accessor", "global_worker_stdstream_dispatcher",
            "ray_print_logs", "print_to_stdstream", "_system_config", "worker_maximum_startup_concurrency",
            "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_API_SERVER_ADDRESS", "_live_trials", "_iterators",
            "uuid_prefix", "_counter", "live_trials", "num_unfinished_live_trials", "trial_data", "experiment_state"),
    "ray (its OptunaSearch)": ("_ot_trials", "_ot_study", "_completed_trials", "_space"),
    "deepspeed": ("__compatible_ops__", "enable_backward_allreduce", "clip_fp32_gradients", "ds_id"),
    "transformers": ("getclosurevars", "nonlocals", "__wrapped__", "hub_kernels", "_load_from_checkpoint",
                     "_load_best_model", "_is_quantized", "cache_params"),
    "accelerate": ("_hf_hook",),
    "mamba-ssm / causal-conv1d": ("selective_scan_cuda", "cpp_functions"),
}  # fmt: skip


def internal_pattern() -> re.Pattern:
    names = sorted({name for names in INTERNALS.values() for name in names}, key=len, reverse=True)
    return re.compile(rf"(?<![A-Za-z0-9_])({'|'.join(map(re.escape, names))})(?![A-Za-z0-9_])")


def internals_used(source: str) -> list[tuple[int, str]]:
    """(line, name) of each upstream internal that ``source``'s code uses (not its docstrings or comments)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    pattern, found = internal_pattern(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.keyword):
            texts = [node.arg or ""]
        elif isinstance(node, ast.Import | ast.ImportFrom):
            texts = [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts = [node.value]
        else:
            continue
        found += [(getattr(node, "lineno", 0), match) for text in texts for match in pattern.findall(text)]
    return sorted(found)


def test_no_upstream_internal_is_used_outside_the_compat_modules():
    upstream_of = {name: upstream for upstream, names in INTERNALS.items() for name in names}
    uses = [
        f"{path.relative_to(ROOT)}:{line} uses {upstream_of[name]}'s {name}"
        for package in ("sdt", "pipeline")
        for path in sorted((ROOT / package).rglob("*.py"))
        if not any(path.is_relative_to(compat) for compat in COMPAT_MODULES)
        for line, name in internals_used(path.read_text())
    ]
    assert uses == [], "move these into sdt/compat/ or pipeline/compat/, each with a test here"


def test_the_scan_sees_an_internal_in_code_not_in_a_docstring_or_a_comment():
    source = '''
"""Reads ray._private.state."""
import os
from ray._private.state import state  # ray._private again
def f(engine, mixer):
    """engine.enable_backward_allreduce"""
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return hasattr(mixer, "_hf_hook") or engine.clip_fp32_gradients or search_space
'''
    assert internals_used(source) == [
        (4, "_private"),
        (7, "RAY_TRAIN_ENABLE_PRINT_PATCH"),
        (8, "_hf_hook"),
        (8, "clip_fp32_gradients"),
    ]
