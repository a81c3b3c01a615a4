"""The sdtune pipeline: Ray Tune sweeps of Ray Train / DeepSpeed trials, MLflow tracking and adapter export."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdtune")
except PackageNotFoundError:  # a source checkout on the path, not installed
    __version__ = "0+unknown"
