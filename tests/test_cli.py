"""Bad job specs: one line naming the field, exit code 2, before Ray starts."""

import os
import subprocess
import sys

import pytest
import ray
import yaml
from typer.testing import CliRunner

from pipeline.cli.commands import app

GOOD = {"name": "ok", "model": {"builtin": "digits"}, "data": {"task": "digits"}}
MAMBA2 = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "num_heads": 8, "head_dim": 8, "n_groups": 2}

BAD_SPECS = [
    ({"name": "ok"}, "model"),
    ({**GOOD, "model": {"builtin": "digits", "name_or_path": "x"}}, "model"),
    ({**GOOD, "name": "a/b"}, "name"),
    ({**GOOD, "training": {"lr": -1}}, "training.lr"),
    ({**GOOD, "training": {"offload_parameters": True}}, "training.offload_parameters"),
    ({**GOOD, "training": {"epochs": 0}}, "training.epochs"),
    ({**GOOD, "training": {"batching": "pack"}}, "training.batching"),
    ({**GOOD, "method": {"name": "adapter"}}, "method.name"),
    ({**GOOD, "method": {"lora_rank": 0}}, "method.lora_rank"),
    ({**GOOD, "method": {"channels_frozen": 1.5}}, "method.channels_frozen"),
    ({**GOOD, "data": {"task": "glue"}}, "data.dataset"),
    ({**GOOD, "data": {"task": "digits", "validation_fraction": 1.5}}, "data.validation_fraction"),
    ({**GOOD, "resources": {"num_workers": 0}}, "resources.num_workers"),
    ({**GOOD, "search": {"space": {"training.lrr": {"grid": [1e-3]}}}}, "search.space.training.lrr"),
    ({**GOOD, "search": {"mode": "best"}}, "search.mode"),
    ({**GOOD, "unknown_section": {}}, "unknown_section"),
    # the selection's counts, checked against the base's shapes before any warmup: 0.99 of 32 inputs, set by the
    # user, trains none (left unset, the default rule would train one)
    (
        {**GOOD, "model": {"architecture": "mamba2", "config": MAMBA2}, "method": {"inputs_frozen": 0.99}},
        "method.inputs_frozen",
    ),
    (
        {**GOOD, "search": {"space": {"method.channels_frozen": {"grid": [0.5, 1.0]}}}},
        "search.space.method.channels_frozen",
    ),
]


@pytest.mark.parametrize(("spec", "field"), BAD_SPECS)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_bad_spec_names_the_field_and_exits_2(command, spec, field, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: {field}:"), result.output
    assert not ray.is_initialized()


def test_bad_override_and_missing_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = CliRunner().invoke(app, ["validate", str(path), "--set", "training.batch_size=0"])
    assert result.exit_code == 2 and "training.batch_size" in result.output
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_valid_spec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "valid (sdlora on digits" in result.output


def test_validate_says_what_each_method_trains(tmp_path):
    """Per arm and kind of layer: what SDT and LoRA train, "(default)" where the family's rule set a count, and
    the trainable parameters (Mamba-2, 8 heads of 8, state 8, hidden 32, 2 layers)."""
    path = tmp_path / "job.yaml"
    arms = [{"name": "sdlora"}, {"name": "lora", "lora_targets": ["in_proj", "out_proj"], "lora_rank": 2}]
    model = {"architecture": "mamba2", "config": MAMBA2}
    path.write_text(yaml.safe_dump({**GOOD, "model": model, "search": {"space": {"method": {"grid": arms}}}}))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()[1:]
    # SDLoRA: 1 head; 2 of 8 states in B and C of the head's one group (2 groups of 4 heads); 1 of 32 inputs;
    # LoRA r8 on out_proj (32 x 64): 1 + 2 x 2 x 1 + 8 x 96 = 773 per layer
    assert lines[0] == (
        "  sdlora: 2 × Mamba2Mixer: heads 1/8 (default); B/C rows 4/16 in 1 of 2 groups (default); "
        "inputs 1/32 per row (default); LoRA r8 on out_proj: 773 trainable parameters each"
    )
    assert lines[1].startswith("  sdlora: trainable: 1,546 of ")
    assert lines[2].startswith("  lora r2 in_proj+out_proj: 2 × Mamba2Mixer: LoRA r2 on in_proj, out_proj: ")


def bad_base(root, kind: str) -> dict:
    """A job's ``model`` section whose base sdt refuses: a Mamba-2 checkpoint with 8 heads (for a ratio that
    freezes them all), a Mamba-2 config whose n_groups does not divide its heads, a Llama checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    if kind == "n_groups":
        return {"architecture": "mamba2", "config": {**MAMBA2, "n_groups": 3}}
    directory = root / kind
    if kind == "mamba2":
        Mamba2ForCausalLM(Mamba2Config(vocab_size=32, **MAMBA2)).save_pretrained(directory)
    else:
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        LlamaForCausalLM(config).save_pretrained(directory)
    return {"name_or_path": str(directory)}


@pytest.mark.parametrize(
    ("kind", "method", "error"),
    [
        ("mamba2", {"channels_frozen": 0.99}, "method.channels_frozen: 0.99 freezes all 8 heads of backbone.layers.0"),
        ("n_groups", {}, "model.config.n_groups: 3 does not divide num_heads 8 (backbone.layers.0.mixer)"),
        ("llama", {}, "model.name_or_path: model_type: 'llama' is not supported; sdt handles mamba, jamba, mamba2"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_a_base_sdt_cannot_tune_is_one_line_naming_the_field_and_starts_nothing(command, kind, method, error, tmp_path):
    path = tmp_path / "job.yaml"
    spec = {**GOOD, "output_dir": str(tmp_path / "runs"), "model": bad_base(tmp_path, kind), "method": method}
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"{path}: {error}"), line
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


@pytest.mark.parametrize("command", ["resume", "export", "report", "ui"])
def test_commands_on_a_sweep_dir_refuse_a_dir_that_is_not_one(command, tmp_path):
    result = CliRunner().invoke(app, [command, str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"{tmp_path}: not a sweep directory (no job.yaml); run `sdtune sweep JOB.yaml` first, or give runs/<job name>"
    )
    assert not ray.is_initialized()


def test_ui_needs_a_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2 and "MLFLOW_TRACKING_URI" in result.output


COMMANDS = ["validate", "pretrain", "train", "sweep", "resume", "export", "report", "ui"]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_as_words_with_an_example(command):
    text = help_text(command)
    for placeholder in ("<bool>", "<list[str]>", "<str>", "<int>", "{job}", "{run_dir}"):
        assert placeholder not in text, (placeholder, text)
    assert "Example" in text and "sdtune " in text


def test_the_command_list_shows_one_whole_sentence_per_command():
    text = help_text()
    assert "<bool>" not in text
    for command in COMMANDS:
        [line] = [line for line in text.splitlines() if line.strip("│ ").startswith(f"{command} ")]
        assert line.rstrip("│ ").endswith("."), line  # one line, ending its sentence


def test_a_verbose_flag_where_libraries_print():
    for command in ("sweep", "resume", "train", "export"):
        assert "--verbose" in help_text(command)


def test_an_unreadable_spec_names_its_path_once(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = CliRunner().invoke(app, ["validate", str(missing)])
    assert result.exit_code == 2
    assert result.output.strip() == f"{missing}: cannot read the job spec: No such file or directory"


@pytest.mark.parametrize("command", ["export", "report"])
def test_export_or_report_before_any_trial_says_to_run_the_sweep(command, tmp_path):
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump({**GOOD, "output_dir": str(tmp_path.parent), "name": tmp_path.name})
    )
    result = CliRunner().invoke(app, [command, str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "run `sdtune sweep` first" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_hub_model_the_hub_cannot_serve_is_one_line_naming_the_field(tmp_path):
    """A hub name that is neither local nor cached, with the hub unreachable (its endpoint a closed local port, as
    on a machine without network): `sdtune validate` says so at once, exit 2, instead of retrying and calling the
    spec valid."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**GOOD, "model": {"name_or_path": "state-spaces/mamba-130m-hf"}}))
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "0",
    }
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.commands", "validate", str(job)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{job}: model.name_or_path: 'state-spaces/mamba-130m-hf' is not a local directory")
    assert "the hub did not answer" in line and result.stdout == ""


def test_a_package_without_compiled_bytecode_is_named_with_its_directory(tmp_path, monkeypatch):
    """A sweep notes packages its workers would compile again at every trial
    (pipeline.cli.preflight.missing_bytecode)."""
    import compileall
    import importlib

    from pipeline.cli.preflight import missing_bytecode

    package = tmp_path / "uncompiled_package_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert missing_bytecode(["uncompiled_package_for_test", "not_installed_anywhere"]) == {
        "uncompiled_package_for_test": tmp_path
    }
    assert compileall.compile_dir(str(package), quiet=1)
    assert missing_bytecode(["uncompiled_package_for_test"]) == {}


def test_a_finished_sweep_moves_an_earlier_failures_error_log_into_its_logs(tmp_path):
    from pipeline.cli.commands import ERROR_LOG, archive_error_log

    sweep_dir = tmp_path / "runs" / "flaky"
    sweep_dir.mkdir(parents=True)
    assert archive_error_log(sweep_dir) is None  # nothing failed before: nothing to move
    (sweep_dir / ERROR_LOG).write_text("Traceback (most recent call last): ...")
    moved = archive_error_log(sweep_dir)
    assert not (sweep_dir / ERROR_LOG).exists()
    assert moved.parent == sweep_dir / "logs" and moved.name.startswith("driver-error-")
    assert moved.read_text() == "Traceback (most recent call last): ..."


def test_a_sweep_of_another_spec_is_refused_before_its_directory_is_claimed(tmp_path):
    """Another command's sweep under the same name: refused, its files (the lock among them) as they were."""
    from pipeline.spec.job import parse_job
    from pipeline.storage.paths import LOCK_FILE

    earlier = {**GOOD, "output_dir": str(tmp_path / "runs"), "training": {"lr": 3e-3}}
    sweep_dir = tmp_path / "runs" / "ok"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "job.yaml").write_text(parse_job(earlier).to_yaml())
    (sweep_dir / LOCK_FILE).write_text("4242")  # the pid of the command that ran it
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sweep_dir.iterdir()}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**earlier, "training": {"lr": 1e-2}}))

    result = CliRunner().invoke(app, ["sweep", str(job)])

    assert result.exit_code == 2 and result.output.startswith(f"{sweep_dir} holds another sweep (its job.yaml differs")
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sweep_dir.iterdir()} == before
    assert not ray.is_initialized()
