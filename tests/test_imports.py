import subprocess
import sys


def test_sdt_imports_no_pipeline_dependency():
    code = "import sys, sdt; print(sorted(m for m in ('ray', 'mlflow', 'deepspeed', 'pipeline') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
