"""Tiny Mamba / Mamba-2 / Jamba models and Mamba-2 hybrids, saved once and loaded back through ``from_pretrained``
like a user's."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import pytest
import torch
from helpers import JAMBA_LAYOUT, VOCAB
from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    FalconH1Config,
    GraniteMoeHybridConfig,
    JambaConfig,
    JambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    NemotronHConfig,
    Zamba2Config,
)

# The Ray clusters the tests start here (ray.cluster_utils.Cluster) and the sdtune commands they run as
# subprocesses must agree on authentication: Ray 2.60 turns token authentication on by default, and a command run
# with it off cannot join a cluster started with it on.
os.environ["RAY_AUTH_MODE"] = "disabled"

TINY_CONFIGS = {
    "mamba": (MambaForCausalLM, MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8)),
    "mamba2": (
        Mamba2ForCausalLM,
        Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            state_size=8,
            num_heads=8,
            head_dim=4,
            n_groups=2,
            expand=2,
            chunk_size=8,
        ),
    ),
    "jamba": (
        JambaForCausalLM,
        JambaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            mamba_d_state=8,
            mamba_dt_rank=4,
            **JAMBA_LAYOUT,
        ),
    ),
}


# The hybrids (docs/hybrids.md): Mamba-2 mixers of 8 heads of 4 in 2 groups, state 8, beside each family's other
# layers. Each one's quirk is in it: Falcon-H1's µP multipliers (none of them 1) and an SSM width (mamba_d_ssm 32)
# other than expand × hidden (48); Granite-4.0-H's MoE beside the shared MLP; Nemotron-H's pattern of mamba,
# attention, MLP and MoE layers; Zamba2's shared transformer block at two depths, with its per-depth adapters.
MAMBA2_SHAPE = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
HYBRID_SETTINGS = {
    "bamba": (BambaConfig, dict(
        **MAMBA2_SHAPE, num_hidden_layers=3, attn_layer_indices=[1], num_key_value_heads=1, mamba_n_heads=8,
        mamba_d_head=4, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=8,
    )),
    "granitemoehybrid": (GraniteMoeHybridConfig, dict(
        **MAMBA2_SHAPE, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], shared_intermediate_size=32,
        num_local_experts=2, num_experts_per_tok=1, num_key_value_heads=1, mamba_n_heads=8, mamba_d_head=4,
        mamba_n_groups=2, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=8,
    )),
    "nemotron_h": (NemotronHConfig, dict(
        **MAMBA2_SHAPE, num_hidden_layers=5, hybrid_override_pattern="M*-ME", num_key_value_heads=1, head_dim=8,
        mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
    )),
    "falcon_h1": (FalconH1Config, dict(
        **MAMBA2_SHAPE, num_hidden_layers=2, num_key_value_heads=1, head_dim=8, mamba_n_heads=8, mamba_d_head=4,
        mamba_n_groups=2, mamba_d_state=8, mamba_d_ssm=32, mamba_expand=3, mamba_chunk_size=8,
        ssm_multipliers=[0.5, 2.0, 1.5, 0.75, 1.25], ssm_in_multiplier=0.8, ssm_out_multiplier=1.125,
    )),
    "zamba2": (Zamba2Config, dict(
        **MAMBA2_SHAPE, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        num_mem_blocks=1, num_key_value_heads=2, n_mamba_heads=8, mamba_headdim=4, mamba_ngroups=2, mamba_d_state=8,
        mamba_expand=2, chunk_size=8, use_shared_attention_adapter=True, use_shared_mlp_adapter=True, adapter_rank=4,
    )),
}  # fmt: skip


def hybrid_config(arch: str, **overrides):
    """``arch``'s tiny config, with ``overrides`` (built anew: a config derives some sizes from others)."""
    config_class, settings = HYBRID_SETTINGS[arch]
    return config_class(**{**settings, **overrides})


HYBRID_CONFIGS = {arch: hybrid_config(arch) for arch in HYBRID_SETTINGS}


@pytest.fixture(scope="session")
def hybrid_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Each hybrid's tiny config as a saved model, random weights (seed 1234)."""
    dirs = {}
    for arch, config in HYBRID_CONFIGS.items():
        torch.manual_seed(1234)
        path = tmp_path_factory.mktemp(f"base-{arch}")
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for arch, (model_class, config) in TINY_CONFIGS.items():
        torch.manual_seed(1234)
        path = tmp_path_factory.mktemp(f"base-{arch}")
        model_class(config).save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.fixture
def load_base(tiny_model_dirs):
    """``load_base(arch)`` -> a fresh fp32 copy of that tiny base model, loaded from disk."""

    def load(arch: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)

    return load


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A private, empty sdtune cache: the default digits base ships with the package, so nothing is pretrained;
    a test that builds another base writes it here, never into ~/.cache.

    Exported as SDTUNE_CACHE so that `sdtune` subprocesses and their Ray workers use it too.
    """
    from pipeline.tasks.digits import CACHE_ENV

    cache = tmp_path_factory.mktemp("sdtune-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    yield cache
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database. Creating one runs MLflow's migrations (4-8 s on 2 cores), so each
    test copies this file instead (MLflow's SQLite store does not use a WAL: the file is the whole store)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, mlflow_template_db) -> str:
    """A fresh SQLite tracking URI (a copy of the migrated template)."""
    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copy(mlflow_template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture
def clean_cwd(tmp_path, monkeypatch):
    """Runs the test in an empty working directory that must stay empty (no stray ./mlruns)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert not list(cwd.iterdir()), "nothing (./mlruns) may appear in the working directory"


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """A bucket on a local S3 server for the session (moto on 127.0.0.1, an ephemeral port, as Ray's own tests do):
    its URI, with the options pyarrow needs. The server's fake credentials go into the environment, as a user's
    would, so `sdtune` subprocesses and Ray clusters started afterwards find them too."""
    from moto.server import ThreadedMotoServer

    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    previous = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(
        "sdtune"
    )
    yield f"s3://sdtune?endpoint_override={endpoint}&region=us-east-1"
    server.stop()
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def two_nodes(s3_bucket):
    """A local two-node Ray cluster (one CPU each) whose nodes share no directory that sdtune uses. Started after the
    S3 server, so that its nodes (and their workers) have the server's credentials in the environment. One per
    module, not per session: even idle, its processes keep ~0.3 of a CPU busy (measured on 2 cores), which every
    later test would lose until the suite ends, against ~15 s to start a second one."""
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # Cluster records itself as this machine's current Ray cluster, which a `ray.init()` without an address (another
    # test's sweep on this machine) would join and fill. The tests give its address.
    reset_ray_address()
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
