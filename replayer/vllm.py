"""What vLLM needs to run GPU-free, applied around an emulated run (the user sets none of it).

vLLM chooses its platform through plugins (entry-point group `vllm.platform_plugins`); an out-of-tree
plugin that answers wins over the built-in ones. Revati's (`platform`) answers only in a process that is
emulating, and names `replayer.vllm_platform.Emulated`: vLLM's CUDA platform reading the virtual GPU
through `torch.cuda`, with the GPU-only kernels it calls shimmed (replayer.shims). vLLM runs its engine
core in a process of its own; that one is emulated as replayer.workers emulates an engine's processes.

- Environment: no usage statistics sent (an emulated run is not a deployment); FlashInfer's sampler off
  (FlashInfer is not installed: vLLM's own Triton and torch sampling run instead); the engine core
  started with `spawn` (vLLM's choice on a GPU whose CUDA is initialized), so that it is emulated from its
  environment and reports its own figures (a forked child would inherit the caller's emulator).
- Engine arguments the adapter (revati.engines.vllm) takes as defaults under emulation: `EMULATED`.

A script that runs vLLM itself under `revati emulate -- ...` (tensor parallelism the torchrun way: vLLM's
`external_launcher`, one engine per rank process) gets the same environment from the plugin, where the
user has not set it.
"""

from __future__ import annotations

import os
from pathlib import Path

from replayer import ranks, workers

STANDINS = (Path(__file__).parent / "standins" / "vision",)

ENVIRONMENT = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
}

# Engine arguments for a virtual GPU. vLLM's default compiles the model with torch.compile (Inductor
# generating Triton kernels for a GPU that is not there) and replays piecewise CUDA graphs for mixed batches
# and full ones for decode. Emulated: no torch.compile, the same full CUDA graphs for decode batches, mixed
# batches eager. `enforce_eager=True` still turns graphs off.
EMULATED: dict[str, object] = {"compilation_mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}


def environment(gpu: str, profile: str | None, host_time: str):
    """vLLM's processes emulated on one shared time (replayer.workers.environment). vLLM logs errors only,
    unless VLLM_LOGGING_LEVEL says otherwise: its start-up information and its warnings about GPU libraries
    it cannot load (DeepGEMM) would bury the run's progress."""
    env = {**ENVIRONMENT, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    return workers.environment(gpu, profile, host_time, env, tuple(map(str, STANDINS)))


def platform() -> str | None:
    """The `vllm.platform_plugins` entry point: the emulated CUDA platform, in an emulated process only."""
    if not os.environ.get(ranks.ENV_FLAG):
        return None
    import sys

    from replayer import shims

    shims.install()
    for key, value in ENVIRONMENT.items():  # read by vLLM when used, after the platform is chosen
        os.environ.setdefault(key, value)
    sys.path.extend(str(p) for p in STANDINS if str(p) not in sys.path)
    return "replayer.vllm_platform.Emulated"
