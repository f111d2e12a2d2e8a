"""Distributed emulation: the virtual process group, collective costs, causal clocks across rank processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replayer import distributed
from revati.cost import Roofline, collective_time
from revati.hardware import gpu

SCRIPT = Path(__file__).parent / "fixtures" / "dist" / "ranks.py"
REVATI = Path(sys.executable).with_name("revati")
H100 = gpu("h100")


@pytest.fixture
def symmetric():
    """A symmetric world of 4 ranks for the test; the default topology again afterwards."""
    distributed.set_topology(distributed.Topology(world_size=4, symmetric=True))
    yield
    distributed.set_topology(distributed.Topology())


def _roofline_emulator():
    from replayer.session import Emulator

    return Emulator(H100, Roofline(H100))


def _all_reduce_cost(nbytes: float, n: int, nodes: int = 1) -> float:
    return Roofline(H100).device_time(
        "revati::all_reduce", {"bytes": nbytes, "group_size": n, "nodes": nodes}, torch.bfloat16
    )


# -- cost model ------------------------------------------------------------------------------------


def test_all_reduce_takes_the_cheaper_of_ring_and_tree():
    small, large = 4096, 256 * 2**20
    ring_small = 2 * 7 * 1e-6 + 2 * 7 / 8 * small / (H100.nvlink_bandwidth * 0.85)
    assert collective_time(H100, "revati::all_reduce", small, 8) < ring_small  # tree: 3 levels, not 14 hops
    ring_large = 2 * 7 * 1e-6 + 2 * 7 / 8 * large / (H100.nvlink_bandwidth * 0.85)
    assert collective_time(H100, "revati::all_reduce", large, 8) == pytest.approx(ring_large)


def test_a_group_across_nodes_runs_at_the_network_rate():
    one = collective_time(H100, "revati::all_gather", 64 * 2**20, 16, nodes=1)
    two = collective_time(H100, "revati::all_gather", 64 * 2**20, 16, nodes=2)
    assert two / one == pytest.approx(H100.nvlink_bandwidth / H100.network_bandwidth, rel=0.05)
    assert collective_time(H100, "revati::all_reduce", 1 << 20, 1) == 0.0


# -- symmetric ranks in one process ----------------------------------------------------------------


def test_nccl_under_emulation_is_the_virtual_backend_and_all_reduce_costs_a_collective(symmetric):
    import torch.distributed as dist

    with _roofline_emulator() as emu:
        dist.init_process_group("nccl")
        assert dist.get_backend() == "revati" and dist.get_world_size() == 4
        x = torch.empty(1024, 1024, device="cuda", dtype=torch.bfloat16)
        clock = emu.clock
        arrival = clock.start_time(0)
        dist.all_reduce(x)
        assert clock.stream_time(0) == pytest.approx(arrival + _all_reduce_cost(2 * 2**20, 4))
    assert not dist.is_initialized()  # the emulation's world goes with it


def test_symmetric_collectives_keep_shadow_values(symmetric):
    import torch.distributed as dist

    with _roofline_emulator():
        dist.init_process_group("nccl")
        c = torch.tensor([3, 4], device="cuda")
        dist.all_reduce(c)
        assert c.tolist() == [12, 16]
        out = torch.empty(8, dtype=torch.int64, device="cuda")
        dist.all_gather_into_tensor(out, c)
        assert out.tolist() == [12, 16] * 4
        m = torch.tensor([5], device="cuda")
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        assert m.item() == 5


def test_a_barrier_blocks_the_host_and_gathers_keep_their_shape(symmetric):
    import torch.distributed as dist

    with _roofline_emulator() as emu:
        dist.init_process_group("nccl")
        w = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)
        w @ w  # queued: the host is far ahead of the stream
        assert emu.clock.now < emu.clock.stream_time(0)
        dist.barrier()
        assert emu.clock.now >= emu.clock.stream_time(0)
        out = torch.empty(8, 2, dtype=torch.int64, device="cuda")
        dist.all_gather_into_tensor(out, torch.tensor([[1, 2], [3, 4]], device="cuda"))
        assert out.tolist() == [[1, 2], [3, 4]] * 4


def test_a_monitored_barrier_on_a_gloo_group_is_a_barrier(symmetric):
    import torch.distributed as dist

    with _roofline_emulator() as emu:
        dist.init_process_group("nccl")
        cpu_group = dist.new_group(backend="gloo")  # SGLang's CPU group, waited on after loading weights
        w = torch.empty(8192, 8192, device="cuda", dtype=torch.bfloat16)
        w @ w
        assert emu.clock.now < emu.clock.stream_time(0)
        dist.monitored_barrier(cpu_group)  # gloo's own: under emulation gloo is the virtual group
        assert emu.clock.now >= emu.clock.stream_time(0)


def test_functional_collectives_reach_the_process_group(symmetric):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    with _roofline_emulator() as emu:
        dist.init_process_group("nccl")
        before = distributed.topology().collectives
        x = torch.empty(4096, 1024, device="cuda", dtype=torch.bfloat16)
        arrival = emu.clock.start_time(0)
        y = funcol.all_reduce(x, "sum", dist.group.WORLD)
        z = y + 1  # waits for the collective
        assert distributed.topology().collectives == before + 1
        assert z.shape == x.shape
        assert emu.clock.stream_time(0) >= arrival + _all_reduce_cost(8 * 2**20, 4)


def test_send_recv_needs_rank_processes(symmetric):
    import torch.distributed as dist

    with _roofline_emulator():
        dist.init_process_group("nccl")
        with pytest.raises(distributed.CollectiveError, match="its own process"):
            dist.send(torch.empty(4, device="cuda"), dst=1)


def test_hf_model_sharded_by_transformers_tp_holds_a_quarter_of_the_weights(symmetric):
    import torch.distributed as dist

    from revati.models import build_model, load_config

    config = load_config("small-llama")
    with _roofline_emulator() as emu:
        whole = build_model(config, "cuda", torch.float32)
        full_bytes = emu.allocator.allocated
        del whole
        dist.init_process_group("nccl")
        model = build_model(config, "cuda", torch.float32, tp=4)
        q = model.model.layers[0].self_attn.q_proj.weight
        assert tuple(q.to_local().shape) == (config.hidden_size // 4, config.hidden_size)
        assert emu.allocator.allocated < full_bytes / 3
        before = distributed.topology().collectives
        ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[:2] == (2, 16)
        # two all-reduces per layer (attention out, MLP down), one for the embedding, one gather for logits
        assert distributed.topology().collectives - before == 2 * config.num_hidden_layers + 2


# -- ranks in separate processes -------------------------------------------------------------------


def _launch(mode: str, ranks: int, tmp_path: Path, timeout: float | None = None):
    from replayer.ranks import launch

    if timeout is not None:
        os.environ[distributed.TIMEOUT_ENV] = str(timeout)
    try:
        code, rows = launch(
            [str(SCRIPT), mode, str(tmp_path)], ranks, "h100", "deterministic", tmp_path / "res"
        )
    finally:
        os.environ.pop(distributed.TIMEOUT_ENV, None)
    seen = {}
    for r in range(ranks):
        path = tmp_path / f"{mode}-{r}.json"
        if path.exists():
            seen[r] = json.loads(path.read_text())
    return code, rows, seen


def test_every_rank_leaves_an_all_reduce_at_the_slowest_arrival_plus_its_cost(tmp_path):
    code, rows, seen = _launch("slow", 4, tmp_path)
    assert code == 0 and len(seen) == 4
    arrivals = {r: s["arrival"] for r, s in seen.items()}
    assert max(arrivals, key=arrivals.get) == 2
    expected = arrivals[2] + _all_reduce_cost(2048 * 2048 * 2, 4)
    for s in seen.values():
        assert s["after"] == pytest.approx(expected, rel=1e-12)
        assert s["sum"] == 1 + 2 + 3 + 4  # values cross processes through the store
        assert s["time"] == seen[0]["time"]  # one time.time() base for all ranks (the launcher's)
    assert [r.rank for r in rows] == [0, 1, 2, 3]


def test_send_recv_keeps_order_and_values_and_waits_for_the_receiver(tmp_path):
    code, _, seen = _launch("p2p", 2, tmp_path)
    assert code == 0
    assert seen[1]["received"] == [[7, 0], [17, 1], [27, 2]]
    big = 1024 * 1024 * 2
    cost = Roofline(H100).device_time(
        "revati::send_recv", {"bytes": big, "group_size": 2, "nodes": 1}, torch.bfloat16
    )
    meet = max(seen[0]["big_arrival"], seen[1]["big_arrival"])
    assert seen[1]["big_arrival"] > seen[0]["big_arrival"]  # the receiver was late
    assert seen[0]["after"] == pytest.approx(meet + cost)
    assert seen[1]["after"] == pytest.approx(meet + cost)


def _ranks_cli(mode: str, tmp_path: Path, *flags: str, timeout: str = "60"):
    """`revati emulate FLAGS -- python ranks.py MODE TMP` in a subprocess, with a collective timeout."""
    return subprocess.run(
        [str(REVATI), "emulate", *flags, "--", "python", str(SCRIPT), mode, str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).parent.parent,
        env={**os.environ, distributed.TIMEOUT_ENV: timeout},
    )  # fmt: skip


def test_batched_receives_listed_before_sends_do_not_deadlock(tmp_path):
    code, _, seen = _launch("exchange", 3, tmp_path, timeout=60)
    assert code == 0
    assert [seen[r]["got"] for r in range(3)] == [102, 100, 101]  # each from its left neighbour


def test_a_rank_that_skips_an_all_reduce_is_named_not_a_hang(tmp_path):
    proc = _ranks_cli("skip", tmp_path, "--pp", "4")
    assert proc.returncode != 0
    assert "rank 3 finished after 2 collectives" in proc.stderr
    assert "collective #2" in proc.stderr


def test_a_rank_that_never_arrives_is_named_at_the_timeout(tmp_path):
    proc = _ranks_cli("hang", tmp_path, "--pp", "2", timeout="2")
    assert proc.returncode != 0
    assert "rank 0 waited 2 s at collective #0 (all_reduce 4096B)" in proc.stderr
    assert "rank(s) 1 never arrived" in proc.stderr


def test_tp_times_pp_processes_from_the_command_line(tmp_path):
    proc = _ranks_cli("mlp", tmp_path, "--tp", "2", "--pp", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ends = [json.loads((tmp_path / f"mlp-{r}.json").read_text())["end"] for r in range(4)]
    assert len(set(ends)) == 1
    assert "4 ranks on virtual NVIDIA H100" in proc.stderr


def test_device_and_host_groups_interleaved_across_processes(tmp_path):
    code, _, seen = _launch("mixed", 3, tmp_path)
    assert code == 0
    for s in seen.values():
        assert s["schedules"] == [[0, 0], [1, 0], [2, 0]]  # rank 0's schedule reached every rank
    assert len({s["after_barrier"] for s in seen.values()}) == 1


def test_symmetric_and_multi_process_modes_agree_on_a_tp_workload(tmp_path):
    from replayer.run import emulate_script

    code, _, seen = _launch("mlp", 4, tmp_path)
    assert code == 0
    processes = [s["after"] for s in seen.values()]
    assert max(processes) == pytest.approx(min(processes), rel=1e-9)
    one = tmp_path / "symmetric"
    one.mkdir()
    code, _ = emulate_script([str(SCRIPT), "mlp", str(one)], H100, Roofline(H100), "deterministic", tp=4)
    assert code == 0
    symmetric = json.loads((one / "mlp-0.json").read_text())["after"]
    assert symmetric == pytest.approx(processes[0], rel=0.01)


# -- the command line ------------------------------------------------------------------------------

SMALL = ["--model", "small-llama", "--workload", "poisson:rate=50,n=3,prompt=fixed(16),output=fixed(4)"]


def _cli(*args: str):
    from typer.testing import CliRunner

    from revati.cli import app

    return CliRunner().invoke(app, ["emulate", *args])


def test_emulate_tp_serves_with_collectives_in_the_trace(tmp_path):
    from revati.schema import read_table

    out = tmp_path / "tp2"
    result = _cli(*SMALL, "--engine", "hf-generate", "--tp", "2", "--ops", "all", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["tp"] == 2 and figures["requests"] == 3
    assert read_table(out, "run").column("tp").to_pylist() == [2]
    names = read_table(out, "ops").column("name").to_pylist()
    assert names.count("revati::all_reduce") >= 2 * 4 * 3  # two per layer per forward, several forwards


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tp", "3"], "--tp: small-llama: tensor parallelism 3 must divide"),
        (["--pp", "2"], "--pp 2: the hf-cb engine has no pipeline parallelism"),
    ],
)
def test_bad_parallelism_is_a_one_line_error(args, needle, tmp_path):
    result = _cli(*SMALL, *args, "--out", str(tmp_path / "never"))
    assert result.exit_code == 2
    assert needle in result.stderr
    assert not (tmp_path / "never").exists()


def test_torchrun_with_transformers_tp_under_emulation(tmp_path):
    """`revati emulate -- torchrun ...`: emulation follows into the ranks torchrun starts."""
    proc = subprocess.run(
        [str(REVATI), "emulate", "--", "torchrun", "--nproc-per-node", "2", str(SCRIPT.with_name("hf_tp.py")),
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = [json.loads((tmp_path / f"hf-{r}.json").read_text()) for r in range(2)]
    assert [s["shape"] for s in seen] == [[2, 20], [2, 20]]
    assert [s["device"] for s in seen] == ["cuda:0", "cuda:1"]  # each rank on its own virtual GPU
    assert seen[0]["q_local"] == [128, 256]  # small-llama's 256 q features, halved
    assert seen[0]["end"] == pytest.approx(seen[1]["end"])
    assert "2 ranks on virtual NVIDIA H100" in proc.stderr


# -- fitted collectives ----------------------------------------------------------------------------


def test_recorded_collectives_replace_the_roofline_once_fitted(tmp_path, recorded_trace):
    """A profile fitted on a trace with all-reduces predicts them from the fit, not from ring / tree."""
    import numpy as np

    from revati.fit import fit

    def law(nbytes):  # a slower fabric than the datasheet: 25 µs + 100 GB/s
        return 25e-6 + nbytes / 100e9

    rng = np.random.default_rng(0)
    steps = []
    for _ in range(30):
        sizes = [int(rng.choice([2**14, 2**17, 2**20, 2**23])) for _ in range(8)]
        steps.append(
            [
                ("revati::all_reduce", [[n // 2]], ["bfloat16"],
                 json.dumps({"bytes": float(n), "group_size": 8.0, "nodes": 1.0}),
                 law(n) * (1 + 0.02 * rng.standard_normal()))
                for n in sizes
            ]
        )  # fmt: skip
    recorded_trace(tmp_path / "rec", steps, tp=8)
    profile = fit([tmp_path / "rec"], holdout=0.0).profile
    roofline = Roofline(H100)
    for n in (2**16, 2**22):
        features = {"bytes": float(n), "group_size": 8.0, "nodes": 1.0}
        fitted = profile.device_time("revati::all_reduce", features, torch.bfloat16)
        assert fitted == pytest.approx(law(n), rel=0.08)
        assert abs(fitted - roofline.device_time("revati::all_reduce", features, torch.bfloat16)) > 0.2 * law(
            n
        )
