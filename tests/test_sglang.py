"""SGLang's own engine under emulation (make test-sglang: needs .venv-sglang, see the Makefile)."""

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from replayer.run import EmulationConfig, emulate  # noqa: E402
from revati.cost import Roofline  # noqa: E402
from revati.hardware import gpu  # noqa: E402
from revati.models import load_config, param_bytes  # noqa: E402
from revati.profile import OpModel, Profile  # noqa: E402
from revati.workloads import Request, Workload  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

# A tiny model: SGLang's defaults size its buffers for thousands of requests of the model's full context.
OPTIONS = {"max_total_tokens": 4096, "max_running_requests": 16, "mem_fraction_static": 0.5}


def _emulate(requests: list[Request], engine: str = "sglang", profile=None, **options):
    spec = gpu("h100")
    config = EmulationConfig(
        engine=engine, model="tiny-llama", gpu="h100", options={**OPTIONS, **options},
        profile=str(profile) if profile is not None else None,
    )  # fmt: skip
    cost = Profile.read(profile) if profile is not None else Roofline(spec)
    return emulate(config, Workload("test", tuple(requests)), spec, cost, load_config("tiny-llama"))


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
    # every token SGLang sampled came from the token oracle (argmax of logits nobody computed); +2: warm-up
    assert result.synthesized.get("aten::argmax", 0) == sum(r.output_tokens for r in requests) + 2


def test_the_scheduler_process_is_emulated_on_the_virtual_gpu(served):
    _, result = served
    assert result.processes >= 3  # the front end here, SGLang's scheduler and detokenizer
    # the model's ops ran in the scheduler, on the virtual device (decode steps as replays of captured graphs)
    assert result.ops > 5_000 and result.graph_replays > 20
    # the scheduler's virtual allocator held the weights and a KV cache of max_total_tokens
    config = load_config("tiny-llama")
    head_dim = config.hidden_size // config.num_attention_heads
    tokens = OPTIONS["max_total_tokens"]
    kv = tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    assert result.peak_memory >= param_bytes(config, torch.bfloat16) + kv
    assert result.clock_stalls == 0


def test_a_request_arriving_during_a_busy_step_queues():
    alone = _emulate([Request("late", 0.0, 16, 4)]).results[0]
    early, busy = _emulate([Request("early", 0.0, 2048, 4), Request("late", 0.001, 16, 4)]).results
    ttft = lambda r: r.first_token - r.arrival  # noqa: E731
    assert early.first_token > busy.arrival  # the early prefill was under way when the late request came
    assert busy.first_token >= early.first_token  # it waited for that step
    assert ttft(busy) > ttft(alone)


def test_the_http_server_serves_every_request_its_tokens_over_http():
    requests = [Request(f"h{i}", 0.05 * i, 10 + 7 * i, 3 + i) for i in range(4)]
    result = _emulate(requests, "sglang-serve")
    assert [len(r.token_times) for r in result.results] == [r.output_tokens for r in requests]
    assert result.processes >= 3 and result.ops > 1000 and result.clock_stalls == 0


def test_sglang_defaults_run_triton_attention_and_graphs_for_decode_and_prefill():
    requests = [Request(f"g{i}", 0.002 * i, 20 + 9 * i, 12) for i in range(4)]
    result = _emulate(requests)
    eager_prefill = _emulate(requests, disable_prefill_cuda_graph=True)
    assert [len(r.token_times) for r in result.results] == [r.output_tokens for r in requests]
    # SGLang's Triton attention kernels ran as attention, their metadata kernels (calling jit helpers such as
    # tl.max) in Triton's interpreter
    assert "revati::attention" in result.unfitted and "triton::get_num_kv_splits_triton" in result.unfitted
    assert not {"triton::_fwd_kernel", "triton::_fwd_grouped_kernel_stage1"} & set(result.unfitted)
    # decode replayed full graphs; prefill replayed breakable ones (captured segments, attention eager between
    # them: SGLang asked cuda-python whether its stream captured), saving the launches eager prefill pays
    assert eager_prefill.graphs_captured >= 2 and eager_prefill.graph_replays >= 10
    assert result.graphs_captured > eager_prefill.graphs_captured
    assert result.graph_replays > eager_prefill.graph_replays
    assert result.metrics.ttft.p50 < eager_prefill.metrics.ttft.p50
    assert result.clock_stalls == 0


def test_a_replayed_decode_graph_prices_attention_over_the_lengths_it_then_holds(tmp_path):
    # attention at 1 us per key of the longest sequence, anything else by the roofline
    attention = OpModel("device", "revati::attention", "bfloat16", "linear", ("kv_len",), (1e-6,))
    profile = Profile(models=[attention], device={"kind": "h100", "name": "NVIDIA H100 80GB HBM3"})
    path = profile.write(tmp_path / "attention.parquet")
    tpot = {p: _emulate([Request("r", 0.0, p, 16)], profile=path).metrics.tpot.p50 for p in (16, 1016)}
    assert tpot[1016] - tpot[16] == pytest.approx(2 * 1000e-6, rel=0.15)  # 2 layers, 1,000 keys more


def test_sglangs_split_count_kernel_computed_on_the_host_matches_the_kernel_itself():
    """The host form of `get_num_kv_splits_triton` (replayer/shims/sglang_kernels.py), which SGLang's decode
    launches every step, against the kernel run in Triton's interpreter on the same random arguments."""
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton as kernel

    from replayer.shims import sglang_kernels  # noqa: F401 - registers the host form
    from replayer.shims import triton as shim

    g = torch.Generator().manual_seed(0)
    cases = 0
    for n in (1, 3, 8, 13):
        for groups, heads, kv_heads in ((1, 32, 8), (2, 32, 32), (1, 8, 1), (1, 28, 4)):
            for top in (4, 900, 70_000):
                seq_lens = torch.randint(1, top, (n,), generator=g, dtype=torch.int32)
                if n > 1 and cases % 3 == 0:
                    seq_lens[:] = seq_lens[0]  # an even batch
                if n == 3 and top == 900:
                    seq_lens[:] = torch.tensor([80, 100, 90])  # just uneven: 8 x longest = 10 x shortest
                args = dict(
                    num_kv_splits_ptr=torch.full((n * groups + 3,), -7, dtype=torch.int32),
                    seq_lens_ptr=seq_lens, num_seq=n, num_group=groups, num_head=heads,
                    num_kv_head=kv_heads, max_kv_splits=16, device_core_count=132,
                    MAX_NUM_SEQ=max(2, 1 << (n - 1).bit_length()),
                    uneven_batch_ptr=torch.full((1,), 5, dtype=torch.int32) if cases % 2 else None,
                )  # fmt: skip
                expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                shim._interpret(kernel, expected, expected, {}, (1,), [])  # its helpers (tl.cdiv) too
                got = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                assert shim._exact["get_num_kv_splits_triton"](got, (1,)) is None
                for k, v in expected.items():
                    if isinstance(v, torch.Tensor):
                        assert torch.equal(got[k], v), f"{k} differs: {got[k].tolist()} != {v.tolist()}"
                cases += 1
    assert cases == 48
