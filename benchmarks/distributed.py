"""Coordination overhead of distributed emulation, as ratios taken in one run (this machine is noisy).

- symmetric (2, 8, 64 ranks): one process stands for every rank (`--tp N`); transformers' own tensor
  parallelism on a Llama with 64 heads generates tokens. Wall time with collectives priced by the virtual
  process group against the same run with every collective a no-op (the whole distributed layer's cost:
  in symmetric mode nothing is exchanged). Target: < 1 % at 64 ranks.
- processes (2, 8): one process per rank running benchmarks/tp_workload.py (plain torch.distributed, two
  all-reduces per layer); arrival times exchanged through the c10d store, against the same processes
  pricing collectives on their own arrival (no exchange). Each rank's wall time counts from its
  emulator's start, so Python's start-up is left out. 64 processes only with --processes 64.

Runs alternate on / off `--rounds` times; the overhead is the ratio of the fastest runs (noise on this
machine only ever adds time), with the ratio of the medians beside it.

    python benchmarks/distributed.py [--ranks 2 8 64] [--processes 2 8] [--rounds 3] [--layers 16 --steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from replayer import distributed
from replayer.ranks import launch
from revati.cost import Roofline
from revati.hardware import gpu

WORKLOAD = Path(__file__).parent / "tp_workload.py"
real_perf_counter = time.perf_counter


# A Llama whose 64 heads and key / value heads shard over 64 ranks (8 layers, hidden 2048)
_TP64_LLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=64,
    num_key_value_heads=64, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip


def _symmetric(ranks: int, new_tokens: int, price: bool) -> tuple[float, float]:
    """transformers' own TP over `ranks` symmetric ranks: generate `new_tokens` for 4 prompts of 128."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig

    from replayer.session import Emulator
    from revati.models import build_model

    spec = gpu("h100")
    distributed.set_topology(distributed.Topology(world_size=ranks, symmetric=True, price=price))
    emu = Emulator(spec, Roofline(spec), ops="none")
    with emu:
        dist.init_process_group("nccl", world_size=ranks, rank=0, store=dist.HashStore())
        model = build_model(LlamaConfig(**_TP64_LLAMA), "cuda", torch.bfloat16, tp=ranks)
        ids = torch.zeros(4, 128, dtype=torch.long, device="cuda")
        t = real_perf_counter()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
        torch.cuda.synchronize()
        wall = real_perf_counter() - t
        virtual = emu.clock.now
        del model
    distributed.set_topology(distributed.Topology())
    return wall, virtual


def _per_collective(ranks: int, calls: int = 4000) -> tuple[float, float]:
    """µs per all-reduce of a (4, 2048) bf16 tensor in a tight loop: priced by the virtual process group,
    and as a no-op (the fastest of five batches each)."""
    import torch
    import torch.distributed as dist

    from replayer.session import Emulator

    spec = gpu("h100")
    out = []
    for price in (True, False):
        distributed.set_topology(distributed.Topology(world_size=ranks, symmetric=True, price=price))
        with Emulator(spec, Roofline(spec), ops="none"):
            dist.init_process_group("nccl", world_size=ranks, rank=0, store=dist.HashStore())
            x = torch.empty(4, 2048, device="cuda", dtype=torch.bfloat16)
            best = float("inf")
            for _ in range(5):
                t = real_perf_counter()
                for _ in range(calls // 5):
                    dist.all_reduce(x)
                best = min(best, (real_perf_counter() - t) / (calls // 5))
            out.append(best * 1e6)
    distributed.set_topology(distributed.Topology())
    return out[0], out[1]


def _processes(ranks: int, argv: list[str], coordinate: bool) -> tuple[float, float]:
    """The slowest rank's wall time from its emulator's start to its exit (not Python's start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        code, rows = launch(
            [str(WORKLOAD), *argv], ranks, "h100", "deterministic", Path(tmp), coordinate=coordinate
        )
    if code:
        raise SystemExit(f"tp_workload.py failed at {ranks} processes (exit {code})")
    return max(r.wall_seconds for r in rows), max(r.virtual_seconds for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 64])
    ap.add_argument("--processes", type=int, nargs="*", default=[2, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=32, help="processes: layers of tp_workload.py")
    ap.add_argument("--steps", type=int, default=32, help="processes: decode steps of tp_workload.py")
    ap.add_argument("--new-tokens", type=int, default=32, help="symmetric: tokens generated")
    args = ap.parse_args()
    argv = [str(args.layers), str(args.steps)]
    console = Console()
    table = Table(title="coordination overhead (wall on / wall off - 1)", title_justify="left")
    for col in ("mode", "ranks", "wall on s", "wall off s", "overhead", "(medians)", "virtual s (on)"):
        table.add_column(col, justify="right")
    cases = [("symmetric", n) for n in args.ranks] + [("processes", n) for n in args.processes]
    for mode, n in cases:
        on, off, virtual = [], [], 0.0
        for _ in range(args.rounds):
            for flag in (True, False):
                if mode == "symmetric":
                    wall, v = _symmetric(n, args.new_tokens, price=flag)
                else:
                    wall, v = _processes(n, argv, coordinate=flag)
                (on if flag else off).append(wall)
                virtual = v if flag else virtual
        m_on, m_off = statistics.median(on), statistics.median(off)
        table.add_row(
            mode, str(n), f"{min(on):.3f}", f"{min(off):.3f}", f"{min(on) / min(off) - 1:+.1%}",
            f"{m_on / m_off - 1:+.1%}", f"{virtual:.4f}",
        )  # fmt: skip
        console.print(f"{mode} {n}: on {[round(x, 3) for x in on]} off {[round(x, 3) for x in off]}")
    distributed.set_topology(distributed.Topology())
    console.print(table)
    priced, noop = _per_collective(max(args.ranks))
    console.print(
        f"one all-reduce at {max(args.ranks)} symmetric ranks: {priced:.1f} µs priced, {noop:.1f} µs as a "
        f"no-op (torch.distributed's own Python): {priced - noop:.1f} µs of emulation per collective"
    )


if __name__ == "__main__":
    main()
