"""Tensor-parallel scaling of one forward pass, emulated: device time per rank at TP 1, 2, 4, 8.

For each TP degree (symmetric ranks, transformers' own tensor parallelism) it runs a prefill and a
decode-sized forward of the model and splits the rank's device time into compute kernels and
collectives. Ideal scaling would be compute(TP1) / N + collectives(N); kernels too small to shrink
(fixed per-kernel floors) keep a decode step above that. TP 1 of a model that does not fit one GPU is
built with memory unbounded: its compute time is still defined.

    python benchmarks/tp_scaling.py [--model llama-3.1-70b] [--gpu h100] [--tp 1 2 4 8]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from replayer import distributed
from replayer.session import Emulator
from revati.cost import Roofline
from revati.hardware import gpu
from revati.models import build_model, load_config
from revati.op_features import op_family
from revati.profile import Profile, shipped_profile

real_perf_counter = time.perf_counter
SHAPES = {"prefill 1x2048": (1, 2048), "decode 64x1": (64, 1)}


def _cost(spec, roofline: bool = False):
    path = None if roofline else shipped_profile(spec.key)
    return Profile.read(path).on(spec) if path is not None else Roofline(spec)


def _measure(config, spec, tp: int, roofline: bool) -> dict[str, tuple[float, float, float]]:
    """Per shape: (compute s, collective s, stream span s) of one forward on rank 0."""
    distributed.set_topology(
        distributed.Topology(world_size=tp, symmetric=True, gpus_per_node=spec.gpus_per_node)
    )
    emu = Emulator(spec, _cost(spec, roofline), ops="all")
    out = {}
    with emu:
        if tp > 1:
            dist.init_process_group("nccl", world_size=tp, rank=0, store=dist.HashStore())
        unbounded = emu.allocator.unbounded()  # TP 1 of a model larger than one GPU: compute time only
        unbounded.__enter__()
        model = build_model(config, "cuda", torch.bfloat16, tp=tp)
        for name, shape in SHAPES.items():
            ids = torch.zeros(shape, dtype=torch.long, device="cuda")
            with torch.no_grad():
                model(ids)  # warm: signatures cached
                torch.cuda.synchronize()
                emu.ops.clear()
                start = emu.clock.stream_time(0)
                model(ids)
                torch.cuda.synchronize()
            span = emu.clock.stream_time(0) - start
            sigs = emu.dispatcher.signatures
            compute = sum(row[5] for row in emu.ops if op_family(sigs[row[1]].key) != "collective")
            coll = sum(row[5] for row in emu.ops if op_family(sigs[row[1]].key) == "collective")
            out[name] = (compute, coll, span)
        del model
        unbounded.__exit__(None, None, None)
    distributed.set_topology(distributed.Topology())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-70b")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument(
        "--roofline", action="store_true", help="price ops by the roofline, not the shipped profile"
    )
    args = ap.parse_args()
    config, spec = load_config(args.model), gpu(args.gpu)
    results = {}
    for tp in args.tp:
        t = real_perf_counter()
        results[tp] = _measure(config, spec, tp, args.roofline)
        Console(stderr=True).print(f"tp {tp}: {real_perf_counter() - t:.1f} s wall")
    table = Table(
        title=f"{args.model} on virtual {spec.name} ({'roofline' if args.roofline else 'shipped profile'}): "
        "one forward, rank 0 (ms)",
        title_justify="left",
    )
    for col in (
        "shape",
        "tp",
        "compute",
        "collectives",
        "stream span",
        "ideal: compute(tp1)/tp + coll",
        "span / ideal",
    ):
        table.add_column(col, justify="right")
    base = results.get(1)
    for name in SHAPES:
        for tp, res in results.items():
            compute, coll, span = res[name]
            ideal = base[name][0] / tp + coll if base else float("nan")
            table.add_row(
                name, str(tp), f"{compute * 1e3:.2f}", f"{coll * 1e3:.2f}", f"{span * 1e3:.2f}",
                f"{ideal * 1e3:.2f}", f"{span / ideal:.2f}",
            )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
