"""vLLM's own engine under emulation (make test-vllm: needs .venv-vllm, see the Makefile)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from replayer import shims, vllm  # noqa: E402
from replayer.run import EmulationConfig, emulate  # noqa: E402
from replayer.session import Emulator  # noqa: E402
from revati.cost import Roofline  # noqa: E402
from revati.hardware import gpu  # noqa: E402
from revati.models import load_config, param_bytes  # noqa: E402
from revati.workloads import Request, Workload  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

H100 = gpu("h100")
# A tiny model: vLLM sizes its KV cache to the free memory of the virtual GPU and its blocks are tiny.
OPTIONS = {"max_model_len": 1024, "gpu_memory_utilization": 0.05, "max_num_seqs": 16}


def _emulate(requests: list[Request]):
    return _emulate_with("vllm", requests)


def _emulate_with(engine: str, requests: list[Request], **options):
    config = EmulationConfig(engine=engine, model="tiny-llama", gpu="h100", options={**OPTIONS, **options})
    return emulate(config, Workload("test", tuple(requests)), H100, Roofline(H100), load_config("tiny-llama"))


@pytest.fixture(scope="module")
def served():
    lengths = [(12, 5), (40, 9), (7, 14), (25, 3), (60, 11), (9, 7)]
    requests = [Request(f"r{i}", 0.02 * i, p, o) for i, (p, o) in enumerate(lengths)]
    return requests, _emulate(requests)


def test_every_request_gets_exactly_its_output_tokens(served):
    requests, result = served
    assert [len(r.token_times) for r in result.results] == [r.output_tokens for r in requests]
    for r in result.results:
        assert r.token_times == sorted(r.token_times) and r.token_times[0] > r.arrival
    # vLLM's sampler is a Triton kernel: its token ids came from the token oracle, through the kernel's rule
    assert result.synthesized.get("triton::_gumbel_sample_kernel", 0) > 0


def test_the_engine_core_process_is_emulated_on_the_virtual_gpu(served):
    _, result = served
    assert result.processes >= 2  # the front end here, vLLM's engine core in a process of its own
    assert result.ops > 5_000  # the model's ops ran in the engine core, on the virtual device
    # its virtual allocator held the weights and the KV cache vLLM sized from the free memory it was shown
    config = load_config("tiny-llama")
    assert result.peak_memory >= param_bytes(config, torch.bfloat16) + 0.04 * H100.memory_bytes
    assert result.clock_stalls == 0
    # the shimmed kernels ran, priced: attention as attention, the KV-cache write, vLLM's fused norms
    assert "_C_cache_ops::reshape_and_cache_flash" in result.unfitted  # the roofline prices it (no profile)


def test_a_request_arriving_during_a_busy_step_queues():
    alone = _emulate([Request("late", 0.0005, 16, 4)]).results[0]
    early, late = _emulate([Request("early", 0.0, 900, 4), Request("late", 0.0005, 16, 4)]).results
    # it arrived while the early request's prefill ran, and was taken up at the next step
    assert late.first_token > alone.first_token
    assert late.first_token >= early.first_token


def test_the_platform_plugin_answers_only_while_emulating():
    code = "from vllm.platforms import current_platform as p; print(type(p).__module__, type(p).__name__)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVATI_")}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "replayer.vllm_platform" not in plain.stdout  # a plain vLLM process: vLLM's own detection
    with vllm.environment("h100", None, "deterministic"):  # what an emulated run gives its processes
        emulated = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert emulated.stdout.split()[-2:] == ["replayer.vllm_platform", "Emulated"], emulated.stderr[-2000:]
    assert vllm.platform() is None  # and in this process, no longer


class _Costs(Roofline):
    """The roofline, remembering the features of every op it priced."""

    def __init__(self, gpu_spec):
        super().__init__(gpu_spec)
        self.priced: dict[str, dict] = {}

    def device_time(self, key, features, dtype):
        self.priced[key] = dict(features)
        return super().device_time(key, features, dtype)


def test_vllm_flash_attention_runs_as_one_priced_attention_kernel():
    shims.install()
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    cost = _Costs(H100)
    with Emulator(H100, cost, ops="none") as emu:
        batch, q_len, heads, kv_heads, dim, blocks, block = 4, 128, 32, 8, 128, 64, 16
        q = torch.empty(batch * q_len, heads, dim, dtype=torch.bfloat16, device="cuda")
        k_cache = torch.empty(blocks, block, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        cu = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
        seqused = torch.full((batch,), q_len, dtype=torch.int32, device="cuda")
        table = torch.arange(batch * 8, dtype=torch.int32, device="cuda").view(batch, 8)
        out = torch.empty_like(q)
        before = emu.clock.streams[0]
        flash_attn_varlen_func(
            q, k_cache, k_cache, max_seqlen_q=q_len, cu_seqlens_q=cu, max_seqlen_k=q_len, seqused_k=seqused,
            causal=True, block_table=table, out=out, fa_version=3,
        )  # fmt: skip
        torch.cuda.synchronize()
        features = cost.priced["revati::attention"]
        assert features["batch"] == batch and features["heads"] == heads and features["kv_heads"] == kv_heads
        # causal prefill: about half of the q_len² pairs, 2 · (dim + dim) flops each
        assert features["flops"] == pytest.approx(2 * batch * heads * q_len * (q_len + 1) / 2 * 2 * dim)
        expected = cost.device_time("revati::attention", features, torch.bfloat16)
        assert emu.clock.streams[0] - before >= expected > 0


@triton.jit
def _offsets(BLOCK: tl.constexpr):
    return tl.arange(0, BLOCK)  # a device function a kernel calls


def test_a_triton_launch_is_priced_and_computes_metadata_exactly():
    import triton
    import triton.language as tl

    @triton.jit
    def _positions(start_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = _offsets(BLOCK)
        start = tl.load(start_ptr + row)
        tl.store(out_ptr + row * n + offs, start + offs, mask=offs < n)

    @triton.jit
    def _scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    cost = _Costs(H100)
    with Emulator(H100, cost, ops="none") as emu:
        starts = torch.tensor([0, 10, 40], dtype=torch.int64, device="cuda")
        positions = torch.zeros(3, 4, dtype=torch.int64, device="cuda")
        _positions[(3,)](starts, positions, 4, BLOCK=4)
        # small integer metadata with values: the kernel ran in Triton's interpreter on them
        assert positions.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13], [40, 41, 42, 43]]
        assert cost.priced["triton::_positions"]["programs"] == 3

        x = torch.empty(1 << 20, device="cuda")  # activations: no values
        y = torch.zeros(1 << 20, device="cuda")
        before = emu.clock.streams[0]
        _scale[(1 << 10,)](x, y, 1 << 20, BLOCK=1024)
        torch.cuda.synchronize()
        features = cost.priced["triton::_scale"]
        assert features == {"programs": 1024.0, "bytes": 8.0 * (1 << 20)}
        assert emu.clock.streams[0] - before >= cost.device_time("triton::_scale", features, torch.float32)
        assert y.value() is None  # it stored to y: what y held is no longer known

        @triton.jit
        def _scatter_rows(idx_ptr, x_ptr, out_ptr, BLOCK: tl.constexpr):
            row = tl.load(idx_ptr + tl.program_id(0))
            offs = tl.arange(0, BLOCK)
            tl.store(out_ptr + row * BLOCK + offs, tl.load(x_ptr + offs))

        rows = torch.tensor([2, 0], dtype=torch.int64, device="cuda")
        out = torch.zeros(3, 1024, device="cuda")
        _scatter_rows[(2,)](rows, x, out, BLOCK=1024)
        # it wrote through out_ptr at rows loaded from idx_ptr: the index keeps its value, out loses its own
        assert rows.tolist() == [2, 0] and out.value() is None


DECODE_HEAVY = [Request(f"d{i}", 0.001 * i, 16, 24) for i in range(4)]


@pytest.fixture(scope="module")
def eager_and_graphs():
    return _emulate_with("vllm", DECODE_HEAVY, enforce_eager=True), _emulate_with("vllm", DECODE_HEAVY)


def test_decode_replays_cuda_graphs_by_default_and_runs_eager_when_asked(eager_and_graphs):
    eager, graphs = eager_and_graphs
    for result in (eager, graphs):
        assert [len(r.token_times) for r in result.results] == [r.output_tokens for r in DECODE_HEAVY]
    assert eager.graphs_captured == eager.graph_replays == 0
    # vLLM captured full graphs of its decode batch sizes and replayed one per decode step
    assert graphs.graphs_captured >= 2 and graphs.graph_replays >= 20
    # one launch per step instead of one per kernel: decode steps are shorter on the virtual clock
    assert graphs.metrics.tpot.p50 < eager.metrics.tpot.p50


def test_vllm_serve_drives_vllms_openai_server_over_http(served):
    requests, offline = served
    result = _emulate_with("vllm-serve", requests)
    assert [len(r.token_times) for r in result.results] == [r.output_tokens for r in requests]
    assert result.processes >= 2 and result.graph_replays > 0
    # the same engine core on the same virtual clock: HTTP adds no device work
    for http, direct in zip(result.results, offline.results, strict=True):
        assert http.first_token == pytest.approx(direct.first_token, rel=0.05)


def test_tensor_parallel_ranks_run_vllm_the_torchrun_way(tmp_path):
    """TP 2 as vLLM's `external_launcher` runs it: a rank per process, each with the whole engine; the
    ranks' all-reduces meet on the virtual device (replayer.distributed), vLLM's own NCCL wrapper finding
    no NCCL library and leaving its collectives to torch.distributed."""
    load_config("tiny-llama").save_pretrained(tmp_path / "model")
    script = Path(__file__).parent / "fixtures" / "vllm" / "tensor_parallel.py"
    argv = ["emulate", "--gpu", "h100", "--", "torchrun", "--nproc-per-node", "2", str(script)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REVATI_", "VLLM_"))}
    run = subprocess.run(
        [sys.executable, "-m", "revati", *argv, str(tmp_path / "model")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    rows = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in rows) == [0, 1], run.stdout[-3000:] + run.stderr[-3000:]
    assert all(r["tokens"] == [8, 8, 8, 8] for r in rows)
    # the ranks met at every collective: one virtual time for generate on both
    assert rows[0]["seconds"] == rows[1]["seconds"] > 0
    table = re.findall(r"│\s+(\d)\s+│\s+[\d.]+\s+│\s+([\d,]+)\s+│", run.stdout + run.stderr)
    collectives = {int(rank): int(n.replace(",", "")) for rank, n in table}
    assert collectives[0] == collectives[1] > 50  # a tiny model's all-reduces, prefill and decode


def _vllm_kernels(directory: Path):
    """vLLM's metadata kernels as Triton JIT functions (until an emulated vLLM platform is chosen, vLLM hands
    out a placeholder `triton`, so their source is loaded again here with the real one)."""
    import importlib.util
    import inspect

    from vllm.v1.worker.gpu import buffer_utils, input_batch

    names = [
        "_prepare_prefill_inputs_kernel",
        "_prepare_pos_seq_lens_kernel",
        "_get_num_sampled_and_rejected_kernel",
        "_combine_sampled_and_draft_tokens_kernel",
        "_post_update_kernel",
    ]
    kernels = [getattr(input_batch, n) for n in names]
    kernels += [buffer_utils._apply_write_kernel, buffer_utils._load_ptr]
    source = "\n\n".join(inspect.getsource(getattr(k, "fn", k)) for k in kernels)  # JITFunction or not
    path = directory / "vllm_metadata_kernels.py"
    path.write_text("import triton\nimport triton.language as tl\n\n" + source)
    spec = importlib.util.spec_from_file_location("vllm_metadata_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases(g: torch.Generator):
    """Each metadata kernel's arguments and grid, as vLLM's model runner passes them, at random."""
    i32, i64 = torch.int32, torch.int64
    r = lambda lo, hi, *shape, dtype=i32: torch.randint(lo, hi, shape, generator=g, dtype=dtype)  # noqa: E731
    reqs, n = 16, 6
    idx = torch.randperm(reqs, generator=g)[:n].to(i32)
    query_len = r(1, 40, n)
    qsl = torch.cat([torch.zeros(1, dtype=i32), torch.cumsum(query_len, 0).to(i32)])
    for lookahead in (0, 3):  # a chunk of each prompt, the prompt's end a few tokens on; two rows decoding
        computed = r(0, 50, reqs)
        prompt = computed.clone()
        prompt[idx.long()] += query_len + r(0, 5, n)
        prompt[idx[:2].long()] = computed[idx[:2].long()]
        yield "_prepare_prefill_inputs_kernel", (n,), dict(
            input_ids_ptr=r(0, 9, 512), next_prefill_tokens_ptr=r(0, 9, max(lookahead, 1), reqs),
            next_prefill_tokens_stride=reqs, num_lookahead=lookahead, idx_mapping_ptr=idx,
            query_start_loc_ptr=qsl, all_token_ids_ptr=r(100, 200, reqs, 128), all_token_ids_stride=128,
            prefill_lens_ptr=prompt, num_computed_tokens_ptr=computed, BLOCK_SIZE=16, LOOKAHEAD_BLOCK=4,
        )  # fmt: skip
    yield "_prepare_pos_seq_lens_kernel", (n + 1,), dict(
        pos_ptr=r(0, 9, 512, dtype=i64), seq_lens_ptr=r(0, 9, reqs), idx_mapping_ptr=idx,
        query_start_loc_ptr=qsl, num_computed_tokens_ptr=r(0, 500, reqs), max_num_reqs=reqs, BLOCK_SIZE=16,
    )  # fmt: skip
    seq_lens, prefill = r(1, 60, n), r(1, 60, reqs)
    cu = torch.cat([torch.zeros(1, dtype=i32), torch.cumsum(r(1, 4, n), 0).to(i32)])
    yield "_get_num_sampled_and_rejected_kernel", (n,), dict(
        num_sampled_ptr=r(0, 4, n), num_rejected_ptr=r(-9, 9, n), seq_lens_ptr=seq_lens, cu_num_logits_ptr=cu,
        idx_mapping_ptr=idx.to(i64), prefill_len_ptr=prefill,
    )  # fmt: skip
    num_logits = cu[1:] - cu[:-1]
    query_len = torch.maximum(query_len, num_logits)
    qsl = torch.cat([torch.zeros(1, dtype=i32), torch.cumsum(query_len, 0).to(i32)])
    yield "_combine_sampled_and_draft_tokens_kernel", (n,), dict(
        input_ids_ptr=r(0, 99, 512), idx_mapping_ptr=idx, last_sampled_tokens_ptr=r(100, 200, reqs),
        query_start_loc_ptr=qsl, seq_lens_ptr=seq_lens, prefill_len_ptr=prefill,
        draft_tokens_ptr=r(200, 300, reqs, 3), draft_tokens_stride=3, cu_num_logits_ptr=cu,
        logits_indices_ptr=r(-9, 0, int(cu[-1]), dtype=i64), BLOCK_SIZE=4, NUM_NEW_SAMPLED_TOKENS=1,
    )  # fmt: skip
    for counts, starts in ((r(0, 3, reqs, 64), qsl), (None, None)):
        live = idx.clone()
        live[2] = -1  # a row to skip
        yield "_post_update_kernel", (n,), dict(
            idx_mapping_ptr=live, num_computed_tokens_ptr=r(0, 500, reqs),
            last_sampled_tokens_ptr=r(0, 9, reqs), output_bin_counts_ptr=counts, output_bin_counts_stride=64,
            sampled_tokens_ptr=r(0, 64, n, 3, dtype=i64), sampled_tokens_stride=3, num_sampled_ptr=r(0, 4, n),
            num_rejected_ptr=r(0, 2, n),
            query_start_loc_ptr=starts, all_token_ids_ptr=r(0, 9, reqs, 128), all_token_ids_stride=128,
            total_len_ptr=r(0, 100, reqs),
        )  # fmt: skip
    for dtype in (i32, torch.float32):  # block tables; sampling parameters
        rows = torch.randperm(reqs, generator=g)[:n].to(i32)
        lengths = r(0, 12, n)
        starts = r(0, 20, n)
        cu = torch.cumsum(lengths, 0).to(i32)
        yield "_apply_write_kernel", (n,), dict(
            output_ptr=r(0, 9, reqs, 32).to(dtype), output_stride=32, write_indices_ptr=rows,
            write_starts_ptr=starts, write_contents_ptr=r(100, 200, int(cu[-1])).to(dtype),
            write_cu_lens_ptr=cu, write_group_ids_ptr=None, BLOCK_SIZE=8, MULTI_GROUP=False,
        )  # fmt: skip


def test_vllms_metadata_kernels_computed_in_torch_match_the_kernels_themselves(tmp_path):
    """The torch forms the emulator runs every step (replayer/shims/vllm_kernels.py) against vLLM's kernels
    run in Triton's interpreter, on the same random arguments: every buffer ends up identical."""
    from replayer.shims import triton as shim
    from replayer.shims import vllm_kernels  # noqa: F401 - registers the torch forms

    kernels = _vllm_kernels(tmp_path)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for name, grid, args in _cases(g):
            kernel = getattr(kernels, name)
            expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            shim._interpreted(kernel)[grid](**expected)
            got = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            assert (
                shim._exact[name]({**shim._defaults(kernel), **got}, grid) is None
            )  # covered, not passed on
            for k, v in expected.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(got[k], v), f"{name}: {k} differs"
