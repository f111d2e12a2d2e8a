"""Shipped model configs, random-weight models and analytic weight sizes."""

from __future__ import annotations

import json

import pytest
import torch

from revati.models import CONFIG_DIR, build_model, load_config, model_names, param_bytes, param_count


def test_shipped_models():
    assert {"llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "tiny-llama", "small-llama"} <= set(model_names())


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "tiny-llama", "small-llama"])
def test_configs_load_in_bfloat16(name):
    config = load_config(name)
    assert config.dtype == torch.bfloat16
    assert config.name_or_path == name


def test_llama_3_1_uses_llama3_rope_scaling():
    config = load_config("LLAMA-3.1-8B")  # names are case-insensitive
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8.0
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.max_position_embeddings == 131072


def test_tiny_llama_sizes():
    c = load_config("tiny-llama")
    assert c.hidden_size == 64 and c.num_hidden_layers == 2 and c.intermediate_size == 128
    assert c.num_attention_heads == 4 and c.num_key_value_heads == 2
    assert c.vocab_size == 512 and c.max_position_embeddings == 4096


def test_load_from_file_and_directory(tmp_path):
    fields = json.loads((CONFIG_DIR / "tiny-llama.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**fields, "hidden_size": 32}))
    assert load_config(tmp_path).hidden_size == 32
    assert load_config(tmp_path / "config.json").hidden_size == 32


def test_unknown_model_names_the_shipped_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*llama-3.1-8b.*tiny-llama"):
        load_config("gpt-5")


def test_config_without_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="config.json: no 'model_type'"):
        load_config(tmp_path)


def test_tiny_model_builds_on_cpu_with_the_predicted_weight_bytes():
    config = load_config("tiny-llama")
    model = build_model(config, "cpu")
    params = list(model.parameters())
    assert not model.training
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device.type for p in params} == {"cpu"}
    assert sum(p.numel() * p.element_size() for p in params) == param_bytes(config)
    assert param_bytes(config, torch.float32) == 2 * param_bytes(config)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-7b", "mistral-7b"])
def test_param_count_matches_the_built_model(name):
    # On the meta device the model has shapes and no storage: a check of the formula at full size.
    config = load_config(name)
    model = build_model(config, "meta")
    assert sum(p.numel() for p in model.parameters()) == param_count(config)


@pytest.mark.parametrize(
    ("name", "billions"), [("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("qwen2.5-7b", 7.62)]
)
def test_param_counts_match_the_published_sizes(name, billions):
    assert param_count(load_config(name)) / 1e9 == pytest.approx(billions, abs=0.01)


def test_llama_3_1_8b_weighs_16_gb_in_bf16():
    assert param_bytes(load_config("llama-3.1-8b")) == 2 * param_count(load_config("llama-3.1-8b"))
    assert param_bytes(load_config("llama-3.1-8b")) / 1e9 == pytest.approx(16.06, abs=0.01)
