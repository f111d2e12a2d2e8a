"""Engine adapters on CPU with a tiny random Llama: every token timed, arrivals honoured, steps observed."""

from __future__ import annotations

import pytest
import torch

from revati.engines import ENGINES, OWN_MODEL, engine_options, run_engine
from revati.engines.prompts import prompt_ids
from revati.models import build_model, load_config
from revati.workloads import Request

# Small cache settings keep the paged cache and its sdpa mask tiny.
CB_OPTIONS = {"page_size": 16, "num_blocks": 64, "max_batch_tokens": 128}
OPTIONS = {"hf-generate": {"batch_size": 4}, "hf-cb": CB_OPTIONS, "hf-serve": CB_OPTIONS}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config("tiny-llama"), "cpu", torch.float32)


class Steps:
    """An observer that records each step and checks starts and ends alternate."""

    def __init__(self):
        self.steps: list[tuple[str, int, int, int]] = []
        self.open = False

    def iteration_start(self, phase, batch_size, tokens, kv_tokens):
        assert not self.open, "iteration_start twice without iteration_end"
        self.open = True
        self.steps.append((phase, batch_size, tokens, kv_tokens))

    def iteration_end(self):
        assert self.open, "iteration_end without iteration_start"
        self.open = False


def staggered_requests() -> list[Request]:
    return [Request(f"r{i}", 0.01 * i, 4 + 3 * i, 2 + i) for i in range(6)]


@pytest.mark.parametrize("engine", sorted(set(ENGINES) - OWN_MODEL))  # sglang: tests/test_sglang.py
def test_every_request_gets_all_its_tokens_after_it_arrives(model, engine):
    requests = staggered_requests()
    completed, steps = [], Steps()
    results = run_engine(
        engine, model, requests, observer=steps, on_result=completed.append, **OPTIONS[engine]
    )

    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert sorted(r.request_id for r in completed) == sorted(r.request_id for r in requests)
    for request, result in zip(requests, results, strict=True):
        assert (result.arrival, result.prompt_tokens, result.output_tokens) == (
            request.arrival,
            request.prompt_tokens,
            request.output_tokens,
        )
        assert len(result.token_times) == request.output_tokens
        assert result.token_times == sorted(result.token_times)
        assert result.token_times[0] > request.arrival  # TTFT > 0
    assert not steps.open
    phases = {phase for phase, *_ in steps.steps}
    assert "prefill" in phases and "decode" in phases
    for phase, batch_size, tokens, kv_tokens in steps.steps:
        assert 1 <= batch_size <= len(requests)
        assert kv_tokens >= tokens >= batch_size
        if phase == "decode":
            assert tokens == batch_size  # one new token per sequence


@pytest.mark.parametrize("engine", [e for e in ("hf-cb", "hf-serve") if e not in OWN_MODEL])
def test_continuous_batching_computes_each_token_once(model, engine):
    # every prompt token is prefilled once and every output token but the last is fed back once
    requests = staggered_requests()
    steps = Steps()
    run_engine(engine, model, requests, observer=steps, **OPTIONS[engine])
    expected = sum(r.prompt_tokens + r.output_tokens - 1 for r in requests)
    assert sum(tokens for _, _, tokens, _ in steps.steps) == expected


@pytest.mark.skipif("hf-serve" not in OWN_MODEL, reason="this transformers serves hf-serve's model here")
def test_a_server_whose_model_has_a_process_of_its_own_serves_every_token_after_arrival():
    # transformers serve 5.25+: the model is built from its config in the process the server spawns (real CPU
    # here), and tokens come back through its queues
    requests = staggered_requests()
    results = run_engine("hf-serve", load_config("tiny-llama"), requests, dtype="float32", **CB_OPTIONS)

    for request, result in zip(requests, results, strict=True):
        assert len(result.token_times) == request.output_tokens
        assert result.token_times == sorted(result.token_times)
        assert result.token_times[0] > request.arrival
    assert results[0].token_times[-1] < results[-1].token_times[-1]


def test_a_server_event_carrying_several_tokens_times_each_of_them(monkeypatch):
    # a stream that fell behind its model joins the texts it had queued into one event (5.25's
    # read_queue_outputs); each word is a token, and all of them arrive with that event
    import asyncio

    from revati.engines import hf_serve

    async def events(client, path, body, what):
        for now, text in [(1.5, "t3"), (2.0, " t9 t4"), (2.5, " t1")]:
            yield now, {"choices": [{"text": text}]}
        yield 2.5, {"choices": [], "usage": {"completion_tokens": 4}}

    monkeypatch.setattr(hf_serve, "events", events)
    times = asyncio.run(hf_serve._complete(None, Request("r", 0.0, 3, 4), [1, 2, 3], False, 1.0))

    assert times == [0.5, 1.0, 1.0, 1.5]


@pytest.mark.skipif("hf-serve" not in OWN_MODEL, reason="this transformers serves hf-serve's model here")
def test_a_server_whose_model_has_a_process_of_its_own_is_given_a_config_not_a_model(model):
    with pytest.raises(ValueError, match="hf-serve.*config"):
        run_engine("hf-serve", model, staggered_requests(), **CB_OPTIONS)


def test_generate_runs_static_batches_of_arrived_requests(model):
    # three requests at once, batch_size 2: a batch of the first two, then the third alone
    requests = [Request("a", 0.0, 5, 4), Request("b", 0.0, 3, 2), Request("c", 0.0, 6, 3)]
    steps = Steps()
    a, b, c = run_engine("hf-generate", model, requests, observer=steps, batch_size=2)

    assert steps.steps == [
        ("prefill", 2, 2 * 5, 2 * 5),  # left-padded to the longest prompt
        *[("decode", 2, 2, 2 * (5 + i)) for i in range(1, 4)],  # runs to its longest request
        ("prefill", 1, 6, 6),
        *[("decode", 1, 1, 6 + i) for i in range(1, 3)],
    ]
    assert b.token_times == a.token_times[:2]  # rows of a batch share its steps
    assert c.token_times[0] > a.token_times[-1]


def test_generate_queues_a_request_arriving_during_a_batch(model):
    requests = [Request("long", 0.0, 8, 40), Request("late", 0.01, 8, 3)]
    steps = Steps()
    long, late = run_engine("hf-generate", model, requests, observer=steps, batch_size=8)

    assert late.token_times[0] > long.token_times[-1]  # waited for the running batch to finish
    assert {batch_size for _, batch_size, _, _ in steps.steps} == {1}


def test_cb_adds_a_late_request_to_the_running_batch(model):
    requests = [Request("long", 0.0, 8, 60), Request("late", 0.02, 8, 3)]
    steps = Steps()
    long, late = run_engine("hf-cb", model, requests, observer=steps, **CB_OPTIONS)

    assert long.token_times[0] < late.arrival < late.token_times[0] < long.token_times[-1]
    assert ("mixed", 2, 1 + 8) in [step[:3] for step in steps.steps]  # its prefill joined a decode of 'long'


def test_unknown_engine_and_option_are_named():
    with pytest.raises(ValueError, match="engines: hf-generate, hf-cb, hf-serve"):
        run_engine("tgi", None, [Request("r", 0.0, 1, 1)])
    with pytest.raises(ValueError, match="no option 'batch_sise'.*batch_size"):
        run_engine("hf-generate", None, [Request("r", 0.0, 1, 1)], batch_sise=4)


def test_engine_options_list_defaults():
    assert engine_options("hf-generate") == {"batch_size": 8, "do_sample": False}
    assert engine_options("hf-cb")["attn_implementation"] == "sdpa"


def test_prompt_ids_are_deterministic_and_avoid_special_tokens(model):
    request = Request("r7", 0.0, 300, 1)
    ids = prompt_ids(request, model.config)
    assert ids == prompt_ids(request, model.config)
    assert ids != prompt_ids(Request("r8", 0.0, 300, 1), model.config)
    assert len(ids) == 300 and all(0 <= i < 512 for i in ids)
    assert {model.config.bos_token_id, model.config.eos_token_id}.isdisjoint(ids)


def test_a_served_engines_connections_send_small_writes_at_once():
    # asyncio turns Nagle's algorithm off only on TCP connections whose socket names its protocol: with it
    # on, the server's next small SSE write waited for the client's delayed ACK (~40 ms of real time), and the
    # load generator read a token late (a deterministic hf-serve run then disagreed with itself now and then).
    import asyncio
    import socket

    from revati.engines.http import loopback_socket

    listening = loopback_socket()

    async def accepted_socket():
        accepted = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda r, w: accepted.set_result(w), sock=listening)
        _, writer = await asyncio.open_connection(*listening.getsockname())
        served = await accepted
        nodelay = served.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for w in (writer, served):
            w.close()
        server.close()
        return nodelay

    assert asyncio.run(accepted_socket()) == 1
