"""Ranks in separate processes: launch them like torchrun, and emulate inside each from its environment.

`launch(argv, ranks=4, ...)` starts one process per rank with torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR / PORT) and a c10d TCPStore held here, as torchrun's agent holds it; a command
that is itself `torchrun ...` is started once and makes its ranks itself. Either way emulation follows
into the ranks through the environment: `replayer/site/sitecustomize.py` runs `activate_from_env()` at
interpreter start in every process that has REVATI_EMULATE and RANK set, so serving code that spawns its
workers is emulated too. Each rank writes its figures to REVATI_RESULTS/rank-R.json when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from replayer import timewarp, tree

SITE_DIR = Path(__file__).parent / "site"
_real_perf_counter = time.perf_counter  # bound before the emulator virtualizes `time`
_real_monotonic = time.monotonic
OWNER_ENV = "REVATI_RANK_PROCESS"  # the pid of the process that is the rank (its helpers only emulate)
ENV_FLAG = "REVATI_EMULATE"
PROFILE_ENV = "REVATI_PROFILE"  # the fitted profile that prices the ops; unset or "roofline": the roofline


@dataclass
class RankResult:
    """What one emulated rank reported at exit."""

    rank: int
    virtual_seconds: float
    collectives: int
    waited: float  # real seconds blocked on other ranks
    ops: int
    peak_memory: int
    wall_seconds: float = 0.0  # real time from the rank's emulator starting to its exit
    exit_code: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_torchrun(argv: list[str]) -> bool:
    """`torchrun ...` or `python -m torch.distributed.run ...`."""
    if not argv:
        return False
    if Path(argv[0]).name == "torchrun":
        return True
    return (
        len(argv) > 2 and argv[1] == "-m" and argv[2] in ("torch.distributed.run", "torch.distributed.launch")
    )


def launch(
    argv: list[str],
    ranks: int,
    gpu: str,
    host_time: str,
    results: Path,
    coordinate: bool = True,
    gpus_per_node: int = 8,
    price: bool = True,
) -> tuple[int, list[RankResult]]:
    """Run `argv` as `ranks` emulated ranks (or as a torchrun command that starts them); returns the worst
    exit code and each rank's figures."""
    import torch.distributed as dist

    results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            **_emulated(gpu, host_time, results),
            "REVATI_COORDINATE": "1" if coordinate else "0",
            "REVATI_PRICE_COLLECTIVES": "1" if price else "0",
            "REVATI_GPUS_PER_NODE": str(gpus_per_node),
        }
    )
    if is_torchrun(argv):
        env.pop("RANK", None)  # torchrun's agent is not a rank; it sets RANK for the processes it starts
        if Path(argv[0]).name == "torchrun":  # this interpreter's torchrun, whether or not it is on PATH
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        code = subprocess.call(argv, env=env)
        return code, collect(results)
    port = _free_port()
    # The store lives here, like torchrun's agent store: a rank that exits early does not take it along.
    store = dist.TCPStore(
        "127.0.0.1", port, ranks, is_master=True, wait_for_workers=False, timeout=timedelta(hours=1)
    )
    env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(min(ranks, gpus_per_node)),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    )
    procs = []
    for r in range(ranks):
        child = {
            **env,
            "RANK": str(r),
            "LOCAL_RANK": str(r % gpus_per_node),
            "GROUP_RANK": str(r // gpus_per_node),
        }
        procs.append(subprocess.Popen(_python(argv), env=child))
    codes = _wait_all(procs)
    del store
    found = collect(results)
    for row in found:
        row.exit_code = codes[row.rank] if row.rank < len(codes) else 0
    return max(codes, key=abs), found


def _wait_all(procs: list[subprocess.Popen], grace: float = 30.0) -> list[int]:
    """Exit codes of the ranks. As torchrun does, once one rank fails the others get `grace` seconds (to
    report the collective they were left waiting at) and are then stopped, rather than waiting forever."""
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = _real_monotonic()
        if failed_at is not None and _real_monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            return [p.wait() for p in procs]
        time.sleep(0.1)


def _python(argv: list[str]) -> list[str]:
    """The command for one rank: this interpreter for a script, a module, or a bare `python`."""
    if argv and (argv[0].endswith(".py") or argv[0] == "-m"):
        return [sys.executable, *argv]
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


def collect(results: Path) -> list[RankResult]:
    """The figures the ranks wrote, in rank order."""
    rows = []
    for path in sorted(results.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        row = json.loads(path.read_text())
        rows.append(RankResult(**{k: v for k, v in row.items() if k in RankResult.__dataclass_fields__}))
    return rows


# -- inside a rank -----------------------------------------------------------------------------------


def worker_environment(
    gpu: str,
    profile: str | None,
    host_time: str,
    results: Path,
    shared_time: Path,
    paths: tuple[str, ...] = (),
) -> dict[str, str]:
    """The environment under which the processes an engine starts itself are emulated (sitecustomize), as rank
    0 of 1, sharing one virtual time (replayer.tree) with the process that sets it; each writes its figures
    to `results`/process-PID.json. `paths` go on PYTHONPATH after the site directory."""
    return {
        **_emulated(gpu, host_time, results, paths),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        PROFILE_ENV: profile or "roofline",
        tree.ENV: str(shared_time),
    }


def _emulated(gpu: str, host_time: str, results: Path, paths: tuple[str, ...] = ()) -> dict[str, str]:
    """What every process emulated from its environment needs: the flag, the GPU, the host-time mode, where to
    report, one time.time() base for all of them, and the site directory (then `paths`) on PYTHONPATH."""
    return {
        ENV_FLAG: "1",
        "REVATI_GPU": gpu,
        "REVATI_HOST_TIME": host_time,
        "REVATI_RESULTS": str(results),
        timewarp.BASES_ENV: json.dumps(timewarp.clock_bases()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE_DIR), *paths, os.environ.get("PYTHONPATH")])),
    }


def activate_from_env() -> None:
    """Emulate this process as the rank its environment names (called from sitecustomize)."""
    from replayer import distributed
    from replayer.session import Emulator
    from revati.cost import Roofline
    from revati.hardware import gpu
    from revati.profile import Profile

    rank = int(os.environ["RANK"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec = gpu(os.environ.get("REVATI_GPU", "h100"))
    distributed.set_topology(
        distributed.Topology(
            world_size=world,
            symmetric=False,
            gpus_per_node=int(os.environ.get("REVATI_GPUS_PER_NODE", "8")),
            coordinate=os.environ.get("REVATI_COORDINATE", "1") == "1",
            price=os.environ.get("REVATI_PRICE_COLLECTIVES", "1") == "1",
        )
    )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    profile = os.environ.get(PROFILE_ENV)
    emu = Emulator(
        spec,
        Roofline(spec) if profile in (None, "", "roofline") else Profile.read(Path(profile)).on(spec),
        host_time=os.environ.get("REVATI_HOST_TIME", "deterministic"),
        ops="none",
        device_count=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device_index=local,
    )
    emu.activate()
    shared = os.environ.get(tree.ENV)
    started = _real_perf_counter()
    # Python processes the rank starts inherit its environment and are emulated too; only the rank reports,
    # unless they share one time (an engine's processes: replayer.tree), where each reports for itself.
    owner = os.environ.setdefault(OWNER_ENV, str(os.getpid())) == str(os.getpid())
    results = os.environ.get("REVATI_RESULTS") if owner or shared else None
    name = f"process-{os.getpid()}.json" if shared else f"rank-{rank}.json"

    def figures() -> dict:
        topo = distributed.topology()
        return {
            "rank": rank,
            "pid": os.getpid(),
            "virtual_seconds": emu.clock.now,
            "collectives": topo.collectives,
            "waited": topo.waited,
            "ops": emu.dispatcher.ops,
            "op_signatures": len(emu.dispatcher.signatures),
            "hot_path_ops": emu.hot_path_ops(),
            "peak_memory": emu.allocator.peak,
            "synthesized": emu.synthesized(),
            "unfitted": sorted(emu.dispatcher.unfitted),
            "clock_stalls": emu.clock.stalls,
            "graphs_captured": emu.graphs_captured,
            "graph_replays": emu.graph_replays,
            "wall_seconds": _real_perf_counter() - started,
        }

    def write(row: dict) -> None:
        if results:
            path = Path(results) / name
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(path)

    def report() -> None:
        import torch

        try:
            torch.cuda.synchronize()  # the rank's last work, and the collectives it waits for
        except Exception:  # noqa: BLE001 - a rank that failed still reports what it had
            pass
        row = figures()
        emu.deactivate()
        write(row)

    if shared:  # an engine's worker: killed at shutdown with no atexit, it reports as it goes (Tree.join)
        emu.share_time(tree.Tree.join(Path(shared), report=lambda: write(figures())))
    atexit.register(report)
