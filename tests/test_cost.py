"""The roofline: compute-bound ops scale with FLOPs, memory-bound ops with bytes, tiny ops hit a floor."""

from __future__ import annotations

import pytest
import torch

from revati.cost import CostModel, Roofline
from revati.hardware import gpu
from revati.op_features import op_features

aten = torch.ops.aten
H100 = Roofline(gpu("h100"))


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def mm_time(m: int, n: int, k: int, model: Roofline = H100, dtype: torch.dtype = torch.bfloat16) -> float:
    a, b = meta(m, k, dtype=dtype), meta(k, n, dtype=dtype)
    key, features = op_features(aten.mm.default, (a, b), {}, meta(m, n, dtype=dtype))
    return model.device_time(key, features, dtype)


def add_time(numel: int, model: Roofline = H100) -> float:
    x = meta(numel)
    key, features = op_features(aten.add.Tensor, (x, x), {}, meta(numel))
    return model.device_time(key, features, torch.bfloat16)


def kernel_time(seconds: float, floor: float) -> float:
    return seconds - floor


def test_roofline_is_a_cost_model():
    assert isinstance(H100, CostModel)
    assert H100.name == "roofline"


def test_a_large_bf16_gemm_is_compute_bound_and_scales_with_flops():
    t = mm_time(8192, 8192, 8192)
    flops = 2 * 8192**3
    assert t == pytest.approx(4e-6 + flops / (989.4e12 * 0.75))
    assert kernel_time(mm_time(8192, 8192, 16384), 4e-6) == pytest.approx(2 * kernel_time(t, 4e-6))


def test_fp8_doubles_the_gemm_rate_on_h100():
    bf16, fp8 = mm_time(8192, 8192, 8192), mm_time(8192, 8192, 8192, dtype=torch.float8_e4m3fn)
    assert kernel_time(fp8, 4e-6) == pytest.approx(kernel_time(bf16, 4e-6) / 2, rel=1e-3)


def test_a_decode_gemm_is_memory_bound_on_its_weights():
    t = mm_time(1, 4096, 4096)
    weight_bytes = 4096 * 4096 * 2
    assert kernel_time(t, 4e-6) == pytest.approx(weight_bytes / (3.35e12 * 0.85), rel=0.01)


def test_a_large_elementwise_op_is_memory_bound_and_scales_with_bytes():
    t = add_time(1 << 26)
    assert kernel_time(t, 2e-6) == pytest.approx(3 * (1 << 26) * 2 / (3.35e12 * 0.85))
    assert kernel_time(add_time(1 << 27), 2e-6) == pytest.approx(2 * kernel_time(t, 2e-6))


def test_memory_bound_ops_follow_the_hbm_bandwidth_of_the_gpu():
    h200 = Roofline(gpu("h200"))
    ratio = kernel_time(add_time(1 << 26), 2e-6) / kernel_time(add_time(1 << 26, h200), 2e-6)
    assert ratio == pytest.approx(4.8 / 3.35)
    assert mm_time(8192, 8192, 8192, h200) == pytest.approx(mm_time(8192, 8192, 8192))  # same tensor cores


def test_tiny_ops_hit_the_kernel_floor():
    assert add_time(16) == pytest.approx(2e-6, rel=1e-3)
    assert mm_time(4, 4, 4) == pytest.approx(4e-6, rel=1e-3)


def test_decode_attention_is_memory_bound_on_the_kv_cache():
    q, k, v = meta(8, 32, 1, 128), meta(8, 8, 4096, 128), meta(8, 8, 4096, 128)
    key, features = op_features(
        aten._scaled_dot_product_flash_attention.default, (q, k, v), {}, (meta(8, 32, 1, 128),)
    )
    t = H100.device_time(key, features, torch.bfloat16)
    assert kernel_time(t, 6e-6) == pytest.approx(features["bytes"] / (3.35e12 * 0.85))
    assert features["flops"] / (989.4e12 * 0.40) < kernel_time(t, 6e-6)


def test_prefill_attention_is_compute_bound():
    q = meta(1, 32, 4096, 128)
    key, features = op_features(
        aten._scaled_dot_product_flash_attention.default, (q, q, q), {"is_causal": True}, (q,)
    )
    t = H100.device_time(key, features, torch.bfloat16)
    assert kernel_time(t, 6e-6) == pytest.approx(features["flops"] / (989.4e12 * 0.40))


def test_views_take_no_device_time_and_less_host_time():
    key, features = op_features(aten.view.default, (meta(4, 6), [24]), {}, meta(24))
    assert H100.device_time(key, features, torch.bfloat16) == 0.0
    assert H100.host_time("aten::view") < H100.host_time("aten::mm")
    assert H100.host_time("revati::attention") == H100.host_time("aten::mm")


def test_a_host_to_device_copy_crosses_pcie():
    dst, src = meta(1 << 24), torch.empty(1 << 24, dtype=torch.bfloat16)
    _, over_pcie = op_features(aten.copy_.default, (dst, src), {}, dst)
    _, on_device = op_features(aten.copy_.default, (dst, meta(1 << 24)), {}, dst)
    pcie = H100.device_time("aten::copy_", over_pcie, torch.bfloat16)
    hbm = H100.device_time("aten::copy_", on_device, torch.bfloat16)
    assert kernel_time(pcie, 2e-6) == pytest.approx((1 << 24) * 2 / (64e9 * 0.85))
    assert pcie > 10 * hbm


def test_all_reduce_follows_the_ring_over_nvlink():
    features = {"bytes": 64e6, "group_size": 8.0}
    t = H100.device_time("revati::all_reduce", features, torch.bfloat16)
    hops = 2 * 7 * 1e-6  # a ring's 14 steps, a microsecond each over NVLink
    assert kernel_time(t, 10e-6) == pytest.approx(hops + 2 * 7 / 8 * 64e6 / (450e9 * 0.85))
    alone = H100.device_time("revati::all_reduce", {"bytes": 64e6, "group_size": 1.0}, torch.bfloat16)
    assert alone == pytest.approx(10e-6)


def test_latencies_are_microseconds():
    assert 1e-6 < H100.launch_latency < 10e-6
    assert 1e-6 < H100.sync_latency < 10e-6


def test_describe_names_the_gpu_and_the_source():
    text = H100.describe()
    assert "NVIDIA H100 80GB HBM3" in text and "datasheet" in text


def test_fp8_on_a_gpu_without_fp8_tensor_cores_says_so():
    with pytest.raises(ValueError, match="no fp8 tensor cores"):
        mm_time(64, 64, 64, Roofline(gpu("a100")), dtype=torch.float8_e4m3fn)
