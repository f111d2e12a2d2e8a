"""What SGLang needs to run GPU-free, applied around an emulated run (the user sets none of it).

SGLang serves from three processes: the caller's (the `Engine` front end, its tokenizer manager), a
scheduler that owns the GPU, and a detokenizer, the last two started with `spawn`. All three are emulated:
as replayer.workers emulates an engine's own processes, on one shared time.

- Stand-ins for GPU-only libraries SGLang imports (replayer/standins/README.md).
- Environment: the fused-op backend forced to torch (norms, activation, rotary in their native forms);
  the radix tree core in Python (the Rust core allocates CUDA memory from C++, out of any Python-level
  emulation's reach); JIT kernel compilation fails fast (SGLang then falls back to torch indexing).
- Engine arguments the adapter (revati.engines.sglang) takes as defaults under emulation: `EMULATED`.
"""

from __future__ import annotations

from pathlib import Path

from replayer import workers

# Stand-ins for SGLang's GPU-only imports, and the torchvision one that vLLM needs too.
STANDINS = (Path(__file__).parent / "standins" / "sglang", Path(__file__).parent / "standins" / "vision")

ENVIRONMENT = {
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    "SGLANG_CRASH_ON_JIT_COMPILE": "1",
}

# Engine arguments for a virtual GPU. Attention and CUDA graphs are SGLang's own defaults, what its users run
# on an H100: Triton attention (priced as attention over each batch's sequence lengths,
# replayer/shims/sglang_kernels.py), full CUDA graphs for decode and breakable ones for prefill (captured
# segments with eager attention between them). `-o attention_backend=torch_native -o disable_cuda_graph=True`
# runs eager torch attention instead. sleep_on_idle makes an idle scheduler wait in a ZeroMQ poll, which the
# shared time sees, instead of spinning.
EMULATED = {
    "attention_backend": "triton",
    "sampling_backend": "pytorch",
    "grammar_backend": "none",
    "disable_cuda_graph": False,
    "disable_custom_all_reduce": True,
    "sleep_on_idle": True,
}


def environment(gpu: str, profile: str | None, host_time: str):
    """SGLang's processes emulated on one shared time (replayer.workers), its stand-ins importable."""
    return workers.environment(gpu, profile, host_time, ENVIRONMENT, tuple(map(str, STANDINS)))
