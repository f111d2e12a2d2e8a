"""Model configs shipped with Revati (HF config.json files in revati/configs/) and random-weight models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

CONFIG_DIR = Path(__file__).parent / "configs"

# Decoder-only families whose weights param_count() knows: q/k/v/o projections, gated MLP, RMSNorms.
_QKV_BIAS_FAMILIES = {"qwen2"}
_KNOWN_FAMILIES = {"llama", "mistral", "qwen2"}


def model_names() -> list[str]:
    """Names of the shipped model configs, e.g. ['llama-3.1-8b', ...]."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _config_path(name_or_path: str | os.PathLike) -> Path:
    shipped = CONFIG_DIR / f"{str(name_or_path).lower()}.json"
    if shipped.is_file():
        return shipped
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: not a shipped config, a config.json or a directory with one; "
        f"shipped models: {', '.join(model_names())}"
    )


def load_config(name_or_path: str | os.PathLike) -> PretrainedConfig:
    """A transformers config from a shipped name ('llama-3.1-8b') or a config.json path; no network."""
    path = _config_path(name_or_path)
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: no 'model_type' field; a Hugging Face config.json names its model type")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers raises ValueError, TypeError or its own validation errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: transformers cannot build a {model_type!r} config from it ({first})"
        ) from None
    config.name_or_path = path.stem if path.parent == CONFIG_DIR else str(path.parent)
    return config


def build_model(
    config: PretrainedConfig, device: str | torch.device, dtype: torch.dtype | None = None, tp: int = 1
):
    """A causal LM with random weights built directly on `device` (default dtype: config's), in eval mode.

    With `tp` > 1 the model is sharded by transformers' own tensor parallelism (the model's `tp_plan`, as
    `from_pretrained(distributed_config=...)` applies it) over a torch.distributed world of `tp` ranks,
    which must be initialised already.
    """
    dtype = dtype or config.dtype or torch.float32
    if tp > 1:
        check_tp(config, tp)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tp > 1:
        from transformers.distributed import DistributedConfig

        cls = type(model)
        distributed, _, meshes = cls.prepare_distribute_model(DistributedConfig(tp_size=tp))
        model = cls.maybe_distribute_model(model, distributed, meshes)
    return model.eval()


def check_tp(config: PretrainedConfig, tp: int) -> None:
    """Raise ValueError unless `tp` divides the model's attention and key / value heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        raise ValueError(
            f"{config.name_or_path or config.model_type}: tensor parallelism {tp} must divide "
            f"the attention heads "
            f"({heads}) and the key / value heads ({kv_heads})"
        )


def param_count(config: PretrainedConfig) -> int:
    """Number of weights of a llama / mistral / qwen2 model, computed from its config."""
    if config.model_type not in _KNOWN_FAMILIES:
        raise ValueError(
            f"param_count knows model types {', '.join(sorted(_KNOWN_FAMILIES))}, not {config.model_type!r}"
        )
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    kv_dim = config.num_key_value_heads * head_dim
    attention = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden
    if getattr(config, "attention_bias", False):
        attention += q_dim + 2 * kv_dim + hidden
    elif config.model_type in _QKV_BIAS_FAMILIES:
        attention += q_dim + 2 * kv_dim
    mlp = 3 * hidden * inter + (2 * inter + hidden if getattr(config, "mlp_bias", False) else 0)
    layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * layer + embeddings + hidden  # + final norm


def param_bytes(config: PretrainedConfig, dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's weights in `dtype` (config's dtype by default)."""
    dtype = dtype or config.dtype or torch.float32
    return param_count(config) * dtype.itemsize
