"""Sparse Dimension Tuning (SDT) + LoRA for Hugging Face Mamba, Jamba and Mamba-2 models.

SDLoRA (Galim et al., arXiv 2410.09016) fine-tunes a few SSM dimensions of every layer (the most-updated channels
and, per channel, states of A_log, plus those channels' B/C weights) and puts LoRA on the linear projections.
All adapters live in *weight space*: ``module.weight`` and ``mixer.A_log`` return base + delta, so the fused
mamba-ssm / Triton kernels, which read weights directly, train them. This package knows nothing of Ray, MLflow
or DeepSpeed.

Typical use::

    import sdt
    cfg = sdt.SDTConfig.preset("sdlora")              # any of sdt.METHODS; fields as keyword overrides
    tuner = sdt.apply(model, cfg)                     # phase "warmup": dense ΔA_log + LoRA train
    ...  # cfg.warmup_steps optimizer steps on tuner.trainable_parameters()
    tuner.start_training(tuner.select())              # base restored, fresh LoRA, sparse deltas at the selection
    ...  # new optimizer and schedule; after the first backward: tuner.check_gradients()
    sdt.save(tuner, "out/adapter")                    # safetensors + JSON (model.save_pretrained writes the same)
    tuner = sdt.load(fresh_base_model, "out/adapter") # same logits; also from a Trainer checkpoint or save_model
    sdt.save_merged(tuner, "out/merged")              # a plain transformers model; the tuner trains on
    merged = tuner.merge()                            # or bake the adapters into this model for good

With ``transformers.Trainer`` or TRL's ``SFTTrainer``: :func:`sdt.integrations.trainer.train_sdt` runs the phases.

Supported: ``MambaForCausalLM``, ``JambaForCausalLM`` (its mamba layers; attention and MoE untouched) and
``Mamba2ForCausalLM``. For Mamba-2 the mapping (heads as channels, B/C rows of in_proj as states) is our
generalisation, not the paper's; see :mod:`sdt.targets`.
"""

from .config import LORA_TARGETS, SDT_TARGETS, SELECTION_FIELDS, SETTINGS, SDTConfig, Setting, trainable_count
from .errors import SDTConfigError, UnsupportedModelError
from .io import AdapterFileError, load, read_config
from .methods import METHODS, Method, register_method
from .model import AdapterCoverageError, Tuner, apply, select, to_compute_dtype
from .plan import LayerPlan, Plan, plan
from .saving import adapter_tensors, save, save_merged, write_atomically
from .selection import SelectionError, select_channels_and_states, select_heads_and_rows, top_indices
from .targets import check_counts, mixers
from .variants import VARIANTS, LoraVariant, register_variant

__all__ = [
    "LORA_TARGETS",
    "METHODS",
    "SDT_TARGETS",
    "SELECTION_FIELDS",
    "SETTINGS",
    "VARIANTS",
    "AdapterCoverageError",
    "AdapterFileError",
    "LayerPlan",
    "LoraVariant",
    "Method",
    "Plan",
    "SDTConfig",
    "SDTConfigError",
    "SelectionError",
    "Setting",
    "Tuner",
    "UnsupportedModelError",
    "adapter_tensors",
    "apply",
    "check_counts",
    "load",
    "mixers",
    "plan",
    "read_config",
    "register_method",
    "register_variant",
    "save",
    "save_merged",
    "select",
    "select_channels_and_states",
    "select_heads_and_rows",
    "to_compute_dtype",
    "top_indices",
    "trainable_count",
    "write_atomically",
]
