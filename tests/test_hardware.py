"""The hardware table: lookup by key, alias and device name; figures in consistent units."""

from __future__ import annotations

import pytest
import torch

from revati.hardware import GPUS, gpu


def test_required_kinds_are_present():
    assert {"h100", "h200", "a100", "l40s"} <= GPUS.keys()


@pytest.mark.parametrize(
    "name", ["h100", "H100", "h100-sxm", "H100_SXM5", "NVIDIA H100 80GB HBM3", " nvidia-h100 "]
)
def test_lookup_accepts_keys_aliases_and_torch_names(name):
    assert gpu(name).key == "h100"


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(ValueError, match="unknown GPU 'v100'.*h100.*a100.*l40s"):
        gpu("v100")


def test_h100_memory_is_what_torch_reports():
    assert gpu("h100").memory_bytes == 85_029_158_912


def test_peak_flops_by_dtype():
    h100 = gpu("h100")
    assert h100.peak_flops(torch.bfloat16) == h100.bf16_flops
    assert h100.peak_flops("float8_e4m3fn") == pytest.approx(2 * h100.bf16_flops, rel=1e-3)
    assert h100.peak_flops("fp32") == h100.fp32_flops
    with pytest.raises(ValueError, match="no fp8 tensor cores"):
        gpu("a100").peak_flops(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="no peak FLOP/s for dtype"):
        h100.peak_flops(torch.int8)


@pytest.mark.parametrize("spec", GPUS.values(), ids=list(GPUS))
def test_figures_are_in_plausible_units(spec):
    # Catches a TB/s written as GB/s or a sparse figure taken for a dense one.
    assert 40 <= spec.sm_count <= 200
    assert 16 * 2**30 <= spec.memory_bytes <= 200 * 2**30
    assert 2e11 <= spec.hbm_bandwidth <= 1e13
    assert 1e14 <= spec.bf16_flops <= 2.5e15  # B200, the fastest listed, is 2.25 PFLOP/s dense
    assert spec.fp32_flops < spec.bf16_flops
    assert spec.fp8_flops is None or spec.fp8_flops == pytest.approx(2 * spec.bf16_flops, rel=0.02)
    assert spec.nvlink_bandwidth is None or spec.nvlink_bandwidth > spec.pcie_bandwidth
    assert spec.compute_capability >= (8, 0)


def test_h200_differs_from_h100_in_memory_only():
    h100, h200 = gpu("h100"), gpu("h200")
    assert h200.bf16_flops == h100.bf16_flops
    assert h200.hbm_bandwidth > h100.hbm_bandwidth
    assert h200.memory_bytes > h100.memory_bytes
