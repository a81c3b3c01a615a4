import subprocess
import sys


def test_sdt_imports_no_pipeline_dependency():
    code = "import sys, sdt; print(sorted(m for m in ('ray', 'mlflow', 'deepspeed', 'pipeline') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_trial_worker_does_not_import_mlflow_through_deepspeed():
    # Workers import pipeline.trial.worker; DeepSpeed's autotuner would import MLflow with it (start-up time, unused).
    # (MLflow is installed, so it is not there for want of it)
    code = (
        "import sys, importlib.util, pipeline.trial.worker, deepspeed.autotuning.autotuner as tuner; "
        "print('mlflow' in sys.modules, tuner.has_mlflow, importlib.util.find_spec('mlflow') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False False True"  # before it: DeepSpeed's accelerator notice
