"""What SGLang needs to run GPU-free, applied around an emulated run (the user sets none of it).

SGLang serves from three processes: the caller's (the `Engine` front end, its tokenizer manager), a
scheduler that owns the GPU, and a detokenizer, the last two started with `spawn`. All three are emulated:
the front end by the run itself, the others from their environment (replayer/site/sitecustomize.py, as
ranks are), and all share one virtual time (replayer.tree) so a request's times read in the front end are
the scheduler's.

- Stand-ins for GPU-only libraries SGLang imports (replayer/standins/README.md).
- Environment: the fused-op backend forced to torch (norms, activation, rotary in their native forms);
  the radix tree core in Python (the Rust core allocates CUDA memory from C++, out of any Python-level
  emulation's reach); JIT kernel compilation fails fast (SGLang then falls back to torch indexing).
- Engine arguments the adapter (revati.engines.sglang) takes as defaults under emulation: `EMULATED`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from replayer import ranks, tree

STANDINS = Path(__file__).parent / "standins"

ENVIRONMENT = {
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
    "SGLANG_CRASH_ON_JIT_COMPILE": "1",
}

# Engine arguments for a virtual GPU. torch_native attention runs on shadow values; sleep_on_idle makes an
# idle scheduler wait in a ZeroMQ poll, which the shared time sees, instead of spinning.
EMULATED = {
    "attention_backend": "torch_native",
    "sampling_backend": "pytorch",
    "grammar_backend": "none",
    "disable_cuda_graph": True,
    "disable_custom_all_reduce": True,
    "sleep_on_idle": True,
}


@contextlib.contextmanager
def environment(gpu: str, profile: str | None, host_time: str):
    """Inside the block, SGLang imported or spawned from this process runs emulated on one shared time.

    Yields the directory where each emulated child writes its figures (process-PID.json); call
    `join(emu)` once this process's emulator is active.
    """
    work = Path(tempfile.mkdtemp(prefix="revati-sglang-"))
    results = work / "results"
    results.mkdir()
    shared = tree.create(work)
    workers = ranks.worker_environment(gpu, profile, host_time, results, shared, (str(STANDINS),))
    env = {**ENVIRONMENT, **workers}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, str(STANDINS))
    try:
        yield results
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(STANDINS))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


def join(emu) -> None:
    """This process (the front end) shares the time of the processes it will start."""
    emu.share_time(tree.Tree.join(Path(os.environ[tree.ENV])))


def children(results: Path) -> list[dict]:
    """The figures each emulated child process last wrote."""
    rows = []
    for path in sorted(results.glob("process-*.json")):
        with contextlib.suppress(ValueError, OSError):
            rows.append(json.loads(path.read_text()))
    return rows
