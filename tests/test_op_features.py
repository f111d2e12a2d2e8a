"""Op keys and features: read from real aten calls on meta tensors, exactly as the emulator sees them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from revati.op_features import (
    canonical_op,
    launches_kernel,
    op_dtype,
    op_family,
    op_features,
    register_features,
    row_features,
)

aten = torch.ops.aten
BF16 = 2  # bytes per element


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


class _Capture(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, float], torch._ops.OpOverload]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        key, features = op_features(func, args, kwargs, out)
        self.calls.append((key, features, func))
        return out


def captured(fn) -> list[tuple[str, dict[str, float], torch._ops.OpOverload]]:
    """Every (key, features, overload) dispatched while running fn."""
    with _Capture() as capture:
        fn()
    return capture.calls


def only(fn, key: str) -> dict[str, float]:
    """Features of the single call with this key made by fn."""
    hits = [features for k, features, _ in captured(fn) if k == key]
    assert len(hits) == 1, f"expected one {key} call, got {len(hits)}"
    return hits[0]


# --- keys ------------------------------------------------------------------------------------------


def test_keys_drop_the_overload_like_the_profiler():
    assert canonical_op(aten.mm.default) == "aten::mm"
    assert canonical_op(aten.add.Tensor) == "aten::add"
    assert canonical_op(aten.add_.Tensor) == "aten::add_"
    assert canonical_op(aten.add) == "aten::add"
    assert canonical_op("aten::add.Tensor") == "aten::add"


def test_profiler_names_of_attention_map_to_the_shared_key():
    assert canonical_op("aten::_scaled_dot_product_flash_attention") == "revati::attention"
    assert canonical_op("aten::_scaled_dot_product_flash_attention_for_cpu") == "revati::attention"
    assert op_family("revati::attention") == "attention"


# --- matmuls ---------------------------------------------------------------------------------------


def test_mm_features_are_exact():
    features = only(lambda: meta(8, 16) @ meta(16, 4), "aten::mm")
    assert features == {
        "m": 8.0,
        "n": 4.0,
        "k": 16.0,
        "batch": 1.0,
        "flops": 2.0 * 8 * 4 * 16,
        "bytes": float((8 * 16 + 16 * 4 + 8 * 4) * BF16),
    }


def test_linear_reaches_dispatch_as_addmm_over_folded_rows():
    features = only(lambda: torch.nn.functional.linear(meta(2, 3, 16), meta(32, 16), meta(32)), "aten::addmm")
    assert (features["m"], features["n"], features["k"]) == (6.0, 32.0, 16.0)
    assert features["flops"] == 2.0 * 6 * 32 * 16


def test_linear_itself_folds_leading_dims_if_it_shows_up():
    x, w = meta(2, 3, 16), meta(32, 16)
    _, features = op_features(aten.linear.default, (x, w), {}, meta(2, 3, 32))
    assert (features["m"], features["n"], features["k"], features["batch"]) == (6.0, 32.0, 16.0, 1.0)


def test_bmm_counts_the_batch():
    features = only(lambda: torch.bmm(meta(5, 8, 16), meta(5, 16, 4)), "aten::bmm")
    assert features["batch"] == 5.0
    assert features["flops"] == 2.0 * 5 * 8 * 4 * 16


def test_scaled_mm_is_a_matmul_on_fp8_operands():
    a, b = meta(64, 128, dtype=torch.float8_e4m3fn), meta(128, 32, dtype=torch.float8_e4m3fn)
    scale = meta(1, dtype=torch.float32)
    args = (a, b, scale, scale)
    key, features = op_features(aten._scaled_mm.default, args, {}, meta(64, 32))
    assert key == "aten::_scaled_mm"
    assert features["flops"] == 2.0 * 64 * 32 * 128
    assert op_dtype(args, {}) == torch.float8_e4m3fn


# --- attention -------------------------------------------------------------------------------------

B, H, L, D = 2, 8, 128, 64


def _bhld() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return meta(B, H, L, D), meta(B, H, L, D), meta(B, H, L, D)


def _blhd() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return meta(B, L, H, D), meta(B, L, H, D), meta(B, L, H, D)


CAUSAL_SPELLINGS = {
    "cpu flash": lambda: aten._scaled_dot_product_flash_attention_for_cpu.default(*_bhld(), is_causal=True),
    "cuda flash": lambda: aten._scaled_dot_product_flash_attention.default(*_bhld(), is_causal=True),
    "cuda efficient": lambda: aten._scaled_dot_product_efficient_attention.default(
        *_bhld(), None, False, is_causal=True
    ),
    "cudnn": lambda: aten._scaled_dot_product_cudnn_attention.default(*_bhld(), None, False, is_causal=True),
    "raw flash kernel": lambda: aten._flash_attention_forward.default(
        *_blhd(), None, None, L, L, 0.0, True, False
    ),
    "raw efficient kernel": lambda: aten._efficient_attention_forward.default(
        *_blhd(), None, None, None, L, L, 0.0, 1
    ),
}


@pytest.mark.parametrize("spelling", CAUSAL_SPELLINGS)
def test_every_spelling_of_attention_has_one_key_and_the_same_shape_features(spelling):
    features = only(CAUSAL_SPELLINGS[spelling], "revati::attention")
    shape = {k: features[k] for k in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim", "causal")}
    assert shape == {
        "batch": B,
        "heads": H,
        "kv_heads": H,
        "q_len": L,
        "kv_len": L,
        "head_dim": D,
        "causal": 1.0,
    }
    # causal prefill attends L(L+1)/2 (query, key) pairs, each 2 FLOPs per dim for QK^T and again for PV
    assert features["flops"] == 2.0 * B * H * (L * (L + 1) / 2) * (2 * D)


def test_non_causal_attention_counts_every_pair():
    features = only(lambda: aten._scaled_dot_product_flash_attention.default(*_bhld()), "revati::attention")
    assert features["causal"] == 0.0
    assert features["flops"] == 4.0 * B * H * L * L * D


def test_decode_attention_reads_the_whole_kv_of_its_heads():
    q, k, v = meta(B, 32, 1, D), meta(B, 8, 1000, D), meta(B, 8, 1000, D)
    features = only(lambda: aten._scaled_dot_product_flash_attention.default(q, k, v), "revati::attention")
    assert (features["heads"], features["kv_heads"], features["q_len"], features["kv_len"]) == (
        32,
        8,
        1,
        1000,
    )
    kv_bytes = 2 * B * 8 * 1000 * D * BF16
    assert kv_bytes < features["bytes"] < 1.1 * kv_bytes


def test_chunked_prefill_in_the_raw_flash_kernel_sees_the_cache_before_it():
    q, k, v = meta(1, 4, H, D), meta(1, 10, H, D), meta(1, 10, H, D)
    features = only(
        lambda: aten._flash_attention_forward.default(q, k, v, None, None, 4, 10, 0.0, True, False),
        "revati::attention",
    )
    pairs = 4 * 10 - 4 * 3 / 2  # bottom-right: query i sees keys 0 .. 6 + i
    assert features["flops"] == 2.0 * H * pairs * (2 * D)


# --- views and other no-kernel ops -----------------------------------------------------------------

VIEWS = {
    "view": lambda x: x.view(24),
    "t": lambda x: x.t(),
    "transpose": lambda x: x.transpose(0, 1),
    "permute": lambda x: x.permute(1, 0),
    "unsqueeze": lambda x: x.unsqueeze(0),
    "squeeze": lambda x: x.unsqueeze(0).squeeze(0),
    "expand": lambda x: x.unsqueeze(0).expand(3, 4, 6),
    "slice": lambda x: x[1:3],
    "select": lambda x: x[1],
    "split": lambda x: x.split(2),
    "chunk": lambda x: x.chunk(2),
    "unbind": lambda x: x.unbind(0),
    "detach": lambda x: x.detach(),
    "as_strided": lambda x: x.as_strided((2, 2), (1, 1)),
    "alias": lambda x: aten.alias.default(x),
    "_unsafe_view": lambda x: aten._unsafe_view.default(x, [24]),
    "in-place unsqueeze_": lambda x: x.unsqueeze_(0),
    "empty": lambda x: torch.empty(3, device="meta"),
}


@pytest.mark.parametrize("name", VIEWS)
def test_views_and_allocations_launch_no_kernel(name):
    x = meta(4, 6)
    calls = captured(lambda: VIEWS[name](x))
    assert calls, "nothing dispatched"
    for key, features, func in calls:
        assert features == {"kernel": 0.0}, key
        assert not launches_kernel(func)
        assert not launches_kernel(key)
        assert op_family(key) == "view"


def test_kernel_ops_launch_kernels():
    for func in (aten.mm.default, aten.add.Tensor, aten.add_.Tensor, aten.copy_.default, aten.clone.default):
        assert launches_kernel(func), func
    assert launches_kernel("aten::add")
    assert launches_kernel("revati::attention")


def test_reshape_launches_a_kernel_only_when_it_copies():
    x = meta(4, 6)
    _, as_view = op_features(aten.reshape.default, (x, [24]), {}, x.view(24))
    assert as_view == {"kernel": 0.0}
    _, as_copy = op_features(aten.reshape.default, (x.t(), [24]), {}, meta(24))
    assert as_copy["bytes"] > 0


# --- memory-bound families -------------------------------------------------------------------------


def test_elementwise_fallback_counts_bytes_in_and_out():
    features = only(lambda: meta(4, 1024) + meta(4, 1024), "aten::add")
    assert features == {"numel": 4096.0, "bytes": 3 * 4096.0 * BF16}


def test_a_broadcast_input_is_read_once():
    row = meta(1024).expand(4, 1024)
    features = only(lambda: meta(4, 1024) * row, "aten::mul")
    assert features["bytes"] == (4096 + 1024 + 4096) * BF16


def test_in_place_ops_read_and_write_their_target():
    x = meta(4, 1024)
    features = only(lambda: x.add_(meta(4, 1024)), "aten::add_")
    assert features["bytes"] == 3 * 4096.0 * BF16


def test_embedding_reads_only_the_rows_it_looks_up():
    ids = torch.empty(2, 5, dtype=torch.long, device="meta")
    features = only(lambda: torch.nn.functional.embedding(ids, meta(128_000, 64)), "aten::embedding")
    assert (features["tokens"], features["dim"]) == (10.0, 64.0)
    assert features["bytes"] == 10 * 8 + 2 * 10 * 64 * BF16


def test_a_kv_cache_write_costs_the_update_not_the_cache():
    small, large = meta(100, 8, 64), meta(100_000, 8, 64)
    slots, update = torch.empty(4, dtype=torch.long, device="meta"), meta(4, 8, 64)
    into_small = only(lambda: small.index_put_((slots,), update), "aten::index_put_")
    into_large = only(lambda: large.index_put_((slots,), update), "aten::index_put_")
    assert into_small == into_large
    assert into_small["bytes"] == 4 * 8 + 2 * 4 * 8 * 64 * BF16


def test_copies_count_source_and_destination_once_and_flag_host_transfers():
    dst = meta(1024)
    on_device = only(lambda: dst.copy_(meta(1024)), "aten::copy_")
    assert on_device == {"numel": 1024.0, "bytes": 2 * 1024.0 * BF16, "cross_device": 0.0}
    from_host = only(lambda: dst.copy_(torch.zeros(1024, dtype=torch.bfloat16)), "aten::copy_")
    assert from_host["cross_device"] == 1.0


def test_norm_and_softmax_rows_and_dims():
    x = meta(6, 4096)
    norm = only(lambda: torch.nn.functional.layer_norm(x, [4096]), "aten::native_layer_norm")
    assert (norm["rows"], norm["dim"]) == (6.0, 4096.0)
    softmax = only(lambda: torch.softmax(x, -1), "aten::_softmax")
    assert (softmax["rows"], softmax["dim"]) == (6.0, 4096.0)


# --- collectives -----------------------------------------------------------------------------------


@pytest.fixture
def fake_group():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group(backend="fake", world_size=4, rank=0, store=FakeStore())
    yield dist
    dist.destroy_process_group()


def test_c10d_and_functional_collectives_share_keys_and_see_the_group(fake_group):
    import torch.distributed._functional_collectives as functional

    x = torch.ones(1024)
    gathered = torch.empty(4096)
    calls = captured(
        lambda: (
            fake_group.all_reduce(x),
            functional.all_reduce(x, "sum", fake_group.group.WORLD).wait(),
            fake_group.all_gather_single(gathered, x),
        )
    )
    collectives = [(key, features) for key, features, _ in calls if key.startswith("revati::")]
    assert collectives == [
        ("revati::all_reduce", {"bytes": 4096.0, "group_size": 4.0}),
        ("revati::all_reduce", {"bytes": 4096.0, "group_size": 4.0}),
        ("revati::all_gather", {"bytes": 4 * 4096.0, "group_size": 4.0}),
    ]


# --- registry --------------------------------------------------------------------------------------


def test_registering_an_op_twice_is_an_error():
    with pytest.raises(RuntimeError, match="aten::mm is registered twice"):
        register_features(aten.mm)(lambda func, a, out: {})


def test_registering_an_overload_instead_of_a_packet_is_an_error():
    with pytest.raises(TypeError, match="op packet like aten.mm"):
        register_features(aten.mm.default)(lambda func, a, out: {})


# --- a whole model ---------------------------------------------------------------------------------

# Untagged ops a Llama generate may leave to the bytes-moved fallback: fills, concatenation, scans,
# membership tests, and .item()'s device-to-host read. Anything else must be tagged pointwise or reduction.
_FALLBACK_EXPECTED = {
    "aten::arange",
    "aten::full",
    "aten::ones",
    "aten::ones_like",
    "aten::zeros",
    "aten::scalar_tensor",
    "aten::cat",
    "aten::cumsum",
    "aten::isin",
    "aten::_local_scalar_dense",
}


@pytest.mark.parametrize("attention_impl", ["sdpa", "eager"])
def test_a_tiny_llama_generate_lands_in_the_intended_families(attention_impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    config._attn_implementation = attention_impl
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        calls = captured(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3))
    families = {}
    for key, features, func in calls:
        family = "view" if features.get("kernel") == 0.0 else op_family(key)
        families.setdefault(family, set()).add(key)
        if family == "elementwise" and key not in _FALLBACK_EXPECTED:
            assert {torch.Tag.pointwise, torch.Tag.reduction} & set(func.tags), (
                f"surprise in the fallback: {func}"
            )
    assert "aten::mm" in families["matmul"]
    assert "aten::embedding" in families["embedding"]
    if attention_impl == "sdpa":
        assert families["attention"] == {"revati::attention"}
    else:
        assert "aten::_softmax" in families["softmax"]


# --- features of trace rows ------------------------------------------------------------------------


def test_a_recorded_row_gets_the_features_of_the_call_it_records():
    a, b = torch.empty(8, 64, device="meta"), torch.empty(64, 32, device="meta")
    _, direct = op_features(aten.mm.default, (a, b), {}, a @ b)
    features, exact = row_features("aten::mm", ((8, 64), (64, 32)), ("float32", "float32"), None)
    assert exact and features == direct and features["flops"] == 2 * 8 * 64 * 32


def test_rows_of_lists_scalars_and_attention_bind_to_their_op():
    cat, exact = row_features("aten::cat", ((2, 4), (3, 4)), ("float32", "float32"), "[0]")
    assert exact and cat["numel"] == 20
    q = (1, 8, 128, 64)
    causal, _ = row_features("revati::attention", (q, q, q), ("bfloat16",) * 3, "[0.0, True, False]")
    full, _ = row_features("revati::attention", (q, q, q), ("bfloat16",) * 3, "[0.0, False, False]")
    assert causal["causal"] == 1.0 and full["causal"] == 0.0 and causal["flops"] < full["flops"]
    assert causal["q_len"] == 128 and causal["heads"] == 8 and causal["head_dim"] == 64


def test_kernel_less_rows_and_rows_no_overload_takes_are_told_apart():
    assert row_features("aten::view", ((4, 4),), ("float32",), None) == ({"kernel": 0.0}, True)
    features, exact = row_features("aten::full", (), (), None)  # its size list is not in the row
    assert not exact and set(features) == {"numel", "bytes"}


def test_the_shipped_cpu_trace_gets_exact_features_for_nearly_all_device_time():
    from revati.schema import read_table

    rows = read_table(Path(__file__).parents[1] / "traces" / "cpu" / "tiny-hf-cb", "ops").to_pylist()
    total = exact_time = 0.0
    for r in rows:
        _, exact = row_features(
            r["name"], tuple(map(tuple, r["input_shapes"])), tuple(r["dtypes"]), r["scalars"]
        )
        total += r["device_duration"]
        exact_time += r["device_duration"] * exact
    assert exact_time / total > 0.97


def test_rows_fill_optional_arguments_and_infinite_scalars():
    clamp, exact = row_features("aten::clamp", ((4, 8),), ("float32",), "[0, 6]")
    assert exact and clamp["numel"] == 32
    fill, exact = row_features("aten::masked_fill", ((4, 8), (4, 8)), ("float32", "bool"), "[-inf]")
    assert exact and fill["bytes"] == 4 * 8 * (4 + 1 + 4)  # input, mask, output
