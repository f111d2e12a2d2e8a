"""Record the GPU traces shipped in traces/; on a CUDA box: `python3 benchmarks/gpu/record_matrix.py OUT`.

Llama-3.1-8B with random weights in bf16, through the recorder's CUDA path:
- `gen-*`: hf-generate, one static batch each, eager: batch sizes 1–256, prompt lengths 128–8192;
- `cb-eager`: hf-cb serving a Poisson workload, eager; then twice more with `capture="timeline"` (no
  profiler: run-to-run noise, and what the profiler costs the request latencies);
- `cb-graph`: the same workload with CUDA graphs (`use_cuda_graph=True`), full and timeline;
- `gen-*-timeline`: two of the hf-generate batches again without the profiler;
- `fixture`: tiny-llama hf-cb with CUDA graphs, 3 requests, raw Kineto profile kept (the recorder's tests
  parse it on machines without a GPU).
Each group is tarred into OUT as soon as it is recorded (OUT keeps at most 8 files), and a summary line
per recording is printed. A recording that fails prints its traceback and the matrix goes on.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch

from recorder.run import RecordConfig, record
from revati.models import load_config
from revati.workloads import parse_workload

GEN = [  # (batch, prompt, output)
    (1, 128, 64),
    (1, 8192, 8),
    (8, 2048, 16),
    (32, 1024, 16),
    (128, 256, 16),
    (256, 128, 16),
]
DEVICE = os.environ.get("REVATI_MATRIX_DEVICE", "cuda")  # cpu (and a small model): a dry run anywhere
MODEL = os.environ.get("REVATI_MATRIX_MODEL", "llama-3.1-8b")
CB_WORKLOAD = "poisson:rate=6,n=32,prompt=lognormal(512,0.8),output=lognormal(32,0.5),max_prompt=4096,seed=1"


def main(out: Path, only: set[str]) -> None:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "-"
    print("torch", torch.__version__, "cuda", torch.version.cuda, gpu, flush=True)
    groups = {
        "fixture": [
            (
                "tiny-cb-graph",
                RecordConfig(
                    engine="hf-cb",
                    model="tiny-llama",
                    device=DEVICE,
                    warmup_requests=1,
                    keep_profile=True,
                    options={"use_cuda_graph": True},
                ),
                "poisson:rate=inf,n=3,prompt=fixed(24),output=fixed(4),seed=0",
            )
        ],
        "profile-8b": [  # the raw profile of a few CUDA-graph steps of the 8B model, for parser work
            (
                "cb-graph-8b-profile",
                RecordConfig(
                    engine="hf-cb",
                    model=MODEL,
                    device=DEVICE,
                    warmup_requests=1,
                    keep_profile=True,
                    options={"use_cuda_graph": True},
                ),
                "poisson:rate=inf,n=4,prompt=fixed(64),output=fixed(4),seed=0",
            )
        ],
        "gen": [
            (
                f"gen-b{b}-p{p}",
                RecordConfig(
                    engine="hf-generate",
                    model=MODEL,
                    device=DEVICE,
                    warmup_requests=1,
                    options={"batch_size": b},
                ),
                f"poisson:rate=inf,n={b},prompt=fixed({p}),output=fixed({o}),seed=0",
            )
            for b, p, o in GEN
        ],
        "cb-eager": [
            ("cb-eager", RecordConfig(engine="hf-cb", model=MODEL, device=DEVICE), CB_WORKLOAD),
            (
                "cb-eager-timeline",
                RecordConfig(engine="hf-cb", model=MODEL, device=DEVICE, runs=2, capture="timeline"),
                CB_WORKLOAD,
            ),
        ],
        "cb-graph": [
            (
                "cb-graph" + suffix,
                RecordConfig(
                    engine="hf-cb",
                    model=MODEL,
                    device=DEVICE,
                    capture=capture,
                    options={"use_cuda_graph": True},
                ),
                CB_WORKLOAD,
            )
            for suffix, capture in (("", "full"), ("-timeline", "timeline"))
        ],
    }
    for b, p, o in (GEN[0], GEN[3]):  # the same batches without the profiler: what recording costs on a GPU
        groups["gen"].append(
            (
                f"gen-b{b}-p{p}-timeline",
                RecordConfig(
                    engine="hf-generate",
                    model=MODEL,
                    device=DEVICE,
                    warmup_requests=1,
                    capture="timeline",
                    options={"batch_size": b},
                ),
                f"poisson:rate=inf,n={b},prompt=fixed({p}),output=fixed({o}),seed=0",
            )
        )
    for group, recordings in groups.items():
        if only and group not in only:
            continue
        done = []
        for name, config, spec in recordings:
            t = time.perf_counter()
            try:
                results = record(config, parse_workload(spec), work / name, load_config(config.model))
            except Exception:  # noqa: BLE001 - report and go on with the matrix
                print(f"!! {name} failed", flush=True)
                traceback.print_exc()
                shutil.rmtree(work / name, ignore_errors=True)
                continue
            finally:
                gc.collect()
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            for r in results:
                m = r.metrics
                print(
                    json.dumps(
                        {
                            "name": name,
                            "trace": str(r.trace_dir.relative_to(work)),
                            "ttft_p50_ms": round(m.ttft.p50 * 1e3, 2),
                            "tpot_p50_ms": round(m.tpot.p50 * 1e3, 3),
                            "tok_s": round(m.throughput_tok_s, 1),
                            "ops": r.ops,
                            "kernels": r.kernels,
                            "iterations": r.iterations,
                            "wall_s": round(r.wall_seconds, 2),
                            "export_s": round(r.export_seconds, 1),
                        }
                    ),
                    flush=True,
                )
            print(f"   {name}: {time.perf_counter() - t:.1f} s in all", flush=True)
            done.append(name)
        if done:
            with tarfile.open(out / f"{group}.tar", "w") as tar:
                for name in done:
                    tar.add(work / name, arcname=name)
            print(f"== {group}.tar {(out / f'{group}.tar').stat().st_size / 2**20:.1f} MiB", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), set(sys.argv[2:]))
