"""`sdtune sweep jobs/quickstart.yaml` end to end on CPU, with real Ray Tune, Ray Train, DeepSpeed and MLflow.

The quickstart's four trials (SDLoRA and a LoRA baseline, two learning rates each; ASHA, two at a time) run on
reduced data; the console is kept and read as a person would. (A resume after the driver is killed is tested in
object storage, tests/test_object_storage.py, and after Ctrl+C in tests/test_reliability.py.) Then a real `mlflow
server` (`sdtune ui`) is asked over its REST API for the runs and looked at with a headless Chromium, the export
directory is checked file by file, the merged model is scored again by plain transformers, and the registered
champion is loaded back with `mlflow.transformers.load_model` and made to generate.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import one_rank_process_group
from processes import failure, free_port, sdtune, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

import sdt
from pipeline.results.costs import driver_runs, sweep_idle
from pipeline.results.outcomes import load_trials
from pipeline.spec.job import load_job
from pipeline.storage.layout import ADAPTER_DIR
from pipeline.storage.paths import content_hash
from pipeline.tasks.metrics import evaluate
from pipeline.tasks.sources import load_task
from pipeline.trial.models import cpu_threads
from pipeline.trial.warmup import INFO_FILE, WARMUP_DIR, WarmupStore, warmup_key
from pipeline.trial.worker import run_warmup, trial_inputs

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
TRIALS = 4
SMALL = ["data.max_train_samples=160", "data.max_eval_samples=40", "training.epochs=2", "training.batch_size=8",
         "training.eval_batch_size=40"]  # fmt: skip
EXPORT_FILES = {"adapter_config.json", "adapter_model.safetensors", "trial.json", "job.yaml", "README.md", "merged"}
CONSOLE = "console-sweep.txt"  # beside the sweep directory


@pytest.fixture(scope="module")
def env(digits_cache):
    import os

    return {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, env):
    """The quickstart on reduced data: (sweep dir, spec, its stdout)."""
    output = tmp_path_factory.mktemp("quickstart")
    overrides = [arg for item in [*SMALL, f"output_dir={output}"] for arg in ("--set", item)]
    result = sdtune("sweep", str(QUICKSTART), *overrides, env=env)
    (output / CONSOLE).write_text(result.stdout + result.stderr)
    assert result.returncode == 0, failure(result)
    sweep_dir = output / "quickstart"
    return sweep_dir, load_job(sweep_dir / "job.yaml"), result.stdout


def test_the_quickstart_runs_its_four_trials_two_at_a_time(sweep):
    _, spec, stdout = sweep
    assert f"trials: {TRIALS} (0 failed)" in stdout
    trials = load_trials(spec)
    assert len(trials) == TRIALS and all(t.status == "TERMINATED" for t in trials)
    methods = sorted(t.config["method"]["name"] for t in trials)
    assert methods == ["lora"] * 2 + ["sdlora"] * 2
    # How many trials held their resources at once, from when each was placed to when it ended: two, never more.
    held = [(t.cost["began_at"], t.cost["ended_at"]) for t in trials]
    assert max(sum(begin <= moment < end for begin, end in held) for moment, _ in held) == 2


def test_shared_warmup_ran_once_per_key(sweep):
    sweep_dir, spec, _ = sweep
    sdlora = [t for t in load_trials(spec) if t.config["method"]["name"] == "sdlora"]
    # the two SDLoRA trials differ only in their learning rate, and the warmup lr is fixed: one warmup key for both
    published = [json.loads(path.read_text()) for path in (sweep_dir / WARMUP_DIR).glob(f"*/{INFO_FILE}")]
    assert len(published) == 1
    assert sorted(t.metrics["warmup/shared"] for t in sdlora) == [0, 1]
    computed_by = [t for t in sdlora if t.metrics["warmup/shared"] == 0]
    assert published[0]["computed_by"] == f"trial-{computed_by[0].trial_id}"


def test_reused_warmup_is_the_one_the_trial_would_have_computed(sweep, monkeypatch):
    """A trial that reused the shared warmup, its warmup computed again here by the trial's own code (one rank on
    the CPU, one thread, as its worker ran): the same warmup key, bit-identical updates, and the selection its
    checkpoint holds."""
    sweep_dir, spec, _ = sweep
    reused = next(t for t in load_trials(spec) if t.metrics.get("warmup/shared") == 1)
    trial, cpu = reused.spec, torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(trial.resources))
    try:
        with one_rank_process_group(monkeypatch):
            model, _, _, batches, total_steps = trial_inputs(trial, cpu, rank=0, world=1)
            tuner = sdt.apply(model, trial.method.to_sdt_config(seed=trial.training.seed))
            _, recomputed = run_warmup(tuner, trial, batches, cpu, total_steps)
    finally:
        torch.set_num_threads(threads)

    [shared_entry] = (sweep_dir / WARMUP_DIR).iterdir()
    assert shared_entry.name == content_hash(warmup_key(trial, total_steps, 1, cpu))
    shared, _ = WarmupStore(sweep_dir).load(shared_entry.name)
    assert shared.keys() == recomputed.keys()
    assert all(
        torch.equal(shared[p][k], recomputed[p][k]) for p in shared for k in shared[p].keys() | recomputed[p].keys()
    )

    selected = tuner.select(recomputed)
    stored = sdt.io.read(reused.checkpoint / ADAPTER_DIR).selection
    assert stored.keys() == selected.keys()
    assert all(torch.equal(stored[p][k], selected[p][k]) for p in stored for k in stored[p].keys() | selected[p].keys())


def test_each_trials_gpu_time_breakdown_adds_up_to_its_wall_time(sweep):
    """Every trial has a cost record whose measured parts (the worker's phases and the driver's ends) account for
    its wall time to within 5% (the rest, other, is what happens between the measured moments: Ray's bookkeeping,
    the worker's own start); the sweep driver's run is recorded; the report shows the breakdown."""
    sweep_dir, spec, _ = sweep
    trials = load_trials(spec)
    assert all(t.cost for t in trials)
    for trial in trials:
        cost = trial.cost
        assert cost["gpus"] == 0  # a CPU sweep
        assert all(cost[part] >= 0 for part in ("startup", "training", "evaluation", "checkpointing", "teardown"))
        assert cost["training"] > 0 and cost["startup"] > 0
        # A trial's time begins when its worker group was placed: before, Ray started its Tune function and Ray
        # Train's controller (and its workers may have waited for the CPUs of a trial ASHA had just stopped), while
        # it held nothing.
        assert cost["queued"] > 0 and cost["wall"] == pytest.approx(cost["ended_at"] - cost["began_at"])
        assert cost["began_at"] == pytest.approx(cost["started_at"] + cost["queued"])
        assert cost["startup_ray"] > 0 and "startup_tune" not in cost  # the placement is known: no split at Tune's
        assert cost["started_at"] < cost["last_report_at"] < cost["ended_at"]
        assert abs(cost["other"]) <= 0.05 * cost["wall"], (trial.trial_id, cost)
        # The digits task's rows have one length (63 tokens): its batches hold no padding.
        assert cost["padding"] == 0 and trial.metrics["train/padding"] == 0
    # The sweep driver's one run holds its 2 trial slots throughout; the trials ran inside it, never more than 2 at
    # once (idle between trials would be negative), and it held slots before the first placement (Ray, Tune).
    [run] = driver_runs(spec.sweep_dir)
    [idle] = sweep_idle([run], [trial.cost for trial in trials])
    assert run["capacity"] == 2 and idle["idle"] >= 0 and idle["unused"] > 0
    assert all(run["started_at"] <= t.cost["started_at"] and t.cost["ended_at"] <= run["ended_at"] for t in trials)
    summary = (sweep_dir / "report" / "summary.md").read_text()
    assert "## Where the time went" in summary and "**total (s)**" in summary and "| driver run 1 |" in summary


def test_the_console_shows_trial_events_and_progress_and_no_library_noise(sweep):
    """What the sweep printed: a line per trial event and progress lines, each trial named by its arm; none of the
    noise of Ray, DeepSpeed and transformers (it is in the sweep's logs/), no line over 300 characters."""
    sweep_dir, spec, _ = sweep
    text = (sweep_dir.parent / CONSOLE).read_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 300
    for noise in ("LOAD_GLOBAL", "PreemptionWatcher", "mamba_ssm", "TrainingReport(", "Trial status:",
                  "worker processes have been started", "Setting accelerator to CPU", "Loading weights",
                  " INFO ", " WARNING "):  # fmt: skip
        assert noise not in text, noise
    trials = load_trials(spec)
    for trial in trials:
        mine = [line.split()[0] for line in lines if f" {trial.trial_id} " in line]
        assert {"started", "progress", "evaluated"} <= set(mine), (trial.trial_id, mine)
        assert ("stopped" if trial.stopped_early else "finished") in mine, (trial.trial_id, mine)
    label = "lora r4 x_proj+dt_proj+out_proj · training.lr="
    assert any(line.startswith("started") and label in line for line in lines)
    assert any(line.startswith("progress") and " · ETA " in line and "tokens/s" in line for line in lines)
    workers_log = (sweep_dir / "logs" / "workers.log").read_text()
    assert "kernel path for mamba" in workers_log and "LOAD_GLOBAL" not in workers_log
    assert (sweep_dir / "logs" / "driver.log").is_file()


def test_the_champion_is_a_transformers_pipeline_that_generates(sweep, monkeypatch):
    """`mlflow.transformers.load_model("models:/quickstart@champion")` against the sweep's store: a text-generation
    pipeline whose answer to a test image is the merged model's own greedy answer."""
    import mlflow

    from pipeline.results.model_card import example_prompt

    sweep_dir, spec, _ = sweep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{sweep_dir}/mlflow.db")
    generator = mlflow.transformers.load_model("models:/quickstart@champion")
    assert generator.task == "text-generation"
    prompt = example_prompt(spec.data)
    [answer] = generator(prompt, max_new_tokens=1, do_sample=False, return_full_text=False)
    merged = AutoModelForCausalLM.from_pretrained(sweep_dir / "export" / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(sweep_dir / "export" / "merged")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(
        merged.generate(ids, max_new_tokens=1, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
    )
    assert answer["generated_text"] == expected
    export = mlflow.artifacts.download_artifacts("models:/quickstart@champion")
    assert (Path(export) / "sdtune_export" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def mlflow_server(sweep, env):
    """`sdtune ui` (a real `mlflow server` on 127.0.0.1) over the sweep's store: its base URL, the address of the
    sweep's runs that it prints, and its process id."""
    sweep_dir = sweep[0]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.commands", "ui", str(sweep_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed = []
        for line in server.stdout:  # blocks until the server says it serves
            printed.append(line)
            if "Application startup complete" in line:
                break
        else:
            pytest.fail(f"mlflow server exited with {server.wait()}")

        def accepting() -> bool:  # twice in full-suite runs, the first request was refused after that line
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}: {''.join(printed)[-3000:]}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(accepting, 60, f"the mlflow server to accept connections on port {port}: {''.join(printed)[-3000:]}")
        [runs_url] = [word for word in printed[0].split() if "/#/experiments/" in word]
        yield f"http://127.0.0.1:{port}", runs_url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=60)


def rest(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_mlflow_server_lists_the_parent_and_one_child_per_trial(sweep, mlflow_server):
    _, spec, _ = sweep
    base, _, _ = mlflow_server
    experiments = rest(base, "experiments/search", {"max_results": 100})["experiments"]
    [experiment] = [e for e in experiments if e["name"] == spec.name]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    runs = rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    [parent] = [run for run, tag in zip(runs, tags) if tag.get("sdtune.role") == "sweep"]
    children = [run for run, tag in zip(runs, tags) if tag.get("sdtune.role") == "trial"]
    assert parent["info"]["status"] == "FINISHED"
    assert len(children) == TRIALS
    trial_ids = {tag["sdtune.trial_id"] for tag in tags if tag.get("sdtune.role") == "trial"}
    assert trial_ids == {t.trial_id for t in load_trials(spec)}  # exactly one child per trial, none duplicated
    for child, tag in ((r, t) for r, t in zip(runs, tags) if t.get("sdtune.role") == "trial"):
        assert child["info"]["status"] == "FINISHED"
        assert tag["mlflow.parentRunId"] == parent["info"]["run_id"]
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["train/loss"] > 0
        assert metrics["cost/wall_s"] > metrics["cost/training_s"] > 0  # the GPU-time breakdown, per trial
    # per optimizer step too: the train loss of every 10th step (20 steps an epoch), at its own step
    run_id = children[0]["info"]["run_id"]
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}"
                                "&metric_key=train/step_loss", timeout=60) as response:  # fmt: skip
        steps = {m["step"] for m in json.load(response)["metrics"]}
    assert {10, 20} <= steps and steps <= {10, 20, 30, 40}
    # the first two trials ran at the same time (max_concurrent_trials: 2)
    first = sorted((c["info"]["start_time"], c["info"]["end_time"]) for c in children)[:2]
    assert first[1][0] < first[0][1]
    # the scheduler's early stops are tagged; the parent carries the winner's values and its registered model
    outcomes = {t.trial_id: t for t in load_trials(spec)}
    for tag in (t for t in tags if t.get("sdtune.role") == "trial"):
        assert tag["sdtune.stopped_early"] == str(outcomes[tag["sdtune.trial_id"]].stopped_early).lower()
    parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    winner = outcomes[parent_tags["sdtune.best_trial_id"]]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["training.lr"] == str(winner.config["training.lr"])
    assert params["method.name"] == winner.config["method"]["name"]
    # the registered version is the parent's, and the alias champion names it (search results carry no aliases)
    query = urllib.parse.urlencode({"filter": f"run_id = '{parent['info']['run_id']}'"})
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/model-versions/search?{query}", timeout=60) as response:
        [version] = json.load(response)["model_versions"]
    query = urllib.parse.urlencode({"name": "quickstart", "alias": "champion"})
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/registered-models/alias?{query}", timeout=60) as response:
        champion = json.load(response)["model_version"]
    assert (version["name"], version["version"]) == ("quickstart", champion["version"])


def test_the_mlflow_server_starts_one_server_process_and_no_job_runner(mlflow_server):
    """`sdtune ui` serves one person: one worker process, and none of MLflow's job runner and consumers (8 processes,
    for GenAI features that a sweep's store does not use)."""
    _, _, pid = mlflow_server
    descendants = [" ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)]
    assert len(descendants) == 1 and "uvicorn" in descendants[0] and "--workers 1" in descendants[0], descendants


def browser() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(browser() is None, reason="needs chromium-headless-shell or chromium")
def test_the_printed_address_opens_the_training_view_of_the_sweep(sweep, mlflow_server, tmp_path):
    """What a headless Chromium shows at the address `sdtune ui` prints: MLflow's "Model training" runs table of
    the sweep, its trials named by their arm (and "stopped early" where ASHA stopped them), sorted by the metric,
    with the epochs reached. (MLflow 3.17 itself opens an experiment on its GenAI overview, "Traces 0" and a
    "Detect Issues" popover, whatever the experiment-kind tag says, mlflow/mlflow#24498: hence the address.)"""
    _, runs_url, _ = mlflow_server
    dom = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
         "--window-size=2400,1200", "--virtual-time-budget=20000", "--dump-dom", runs_url],
        capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    text = " | ".join(filter(None, (line.strip() for line in html.unescape(re.sub(r"<[^>]+>", "\n", re.sub(
        r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S))).splitlines())))  # fmt: skip
    assert "Model training | quickstart | Runs" in text and "Sort: eval/accuracy" in text
    for shown in ("eval/accuracy", "test/accuracy", "epochs_reached", "method.name", "training.lr",
                  "lora r4 x_proj+dt_proj+out_proj · training.lr="):  # fmt: skip
        assert shown in text, shown
    for trial in load_trials(sweep[1]):  # each trial's run, named by its arm, says whether ASHA stopped it
        assert f"[{trial.trial_id}]" + (" · stopped early at epoch 1 of 2" if trial.stopped_early else " |") in text
    assert "Detect Issues" not in text and "Traces | 0" not in text


def test_export_holds_the_contract_and_the_merged_model_reproduces_the_metric(sweep):
    sweep_dir, spec, stdout = sweep
    export = sweep_dir / "export"
    assert f"{export}" in stdout
    assert {p.name for p in export.iterdir()} == EXPORT_FILES
    trial = json.loads((export / "trial.json").read_text())
    trials = {t.trial_id: t for t in load_trials(spec)}
    best = max((t for t in trials.values()), key=lambda t: t.metrics["eval/accuracy"])
    assert trial["metrics"]["eval/accuracy"] == best.metrics["eval/accuracy"]
    assert trials[trial["trial_id"]].metrics["eval/accuracy"] == best.metrics["eval/accuracy"]

    config = json.loads((export / "adapter_config.json").read_text())
    assert config["sdt"]["method"] == trials[trial["trial_id"]].config["method"]["name"]
    winner = load_job(export / "job.yaml")
    assert winner.training.lr == trials[trial["trial_id"]].config["training.lr"]

    merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export / "merged")
    scores = evaluate(merged, load_task(winner.data, tokenizer), "validation", tokenizer, winner.data,
                      batch_size=winner.training.eval_batch_size)  # fmt: skip
    assert scores["accuracy"] == pytest.approx(trial["metrics"]["eval/accuracy"], abs=1e-9)
    assert yaml.safe_load((export / "job.yaml").read_text())["name"] == spec.name
