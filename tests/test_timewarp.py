"""Time warp: sleeps, waits and event loops run on the virtual clock, in virtual-time order, for free."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from replayer import clock
from replayer.clock import _ACTOR_GRACE

_real_sleep = time.sleep
_real_perf_counter = time.perf_counter  # wall time, captured before any emulator patches `time`

D = 1e-3  # seconds one aten::mm keeps its stream busy


def _mm():
    a = torch.empty(64, 64, device="cuda")
    return a @ a


def _run(*targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"


def test_sleep_advances_virtual_time_exactly_and_costs_no_wall_time(emulate):
    emu = emulate()
    wall, t0 = _real_perf_counter(), time.monotonic()
    time.sleep(100)
    assert time.monotonic() - t0 == 100.0
    assert emu.clock.now == 100.0
    assert _real_perf_counter() - wall < 0.5


def test_clocks_read_whole_nanoseconds_however_the_instant_was_summed(emulate):
    # One virtual instant, reached by launches in one run and by a jump to a deadline in another, differs in
    # its last bits; read as a real clock reads (whole ns), both runs see the same time, as deterministic mode
    # promises (with the base's bits added, they read a few ps apart)
    emu = emulate()
    t0, t0_ns = time.perf_counter(), time.perf_counter_ns()
    emu.clock.advance(1.0)
    exact = time.perf_counter(), time.perf_counter_ns()
    emu.clock.advance(2e-10)  # the same instant, summed otherwise
    assert (time.perf_counter(), time.perf_counter_ns()) == exact
    assert exact[0] - t0 == 1.0 and exact[1] - t0_ns == 1_000_000_000


def test_polling_in_short_sleeps_lets_real_time_pass_for_what_the_os_does_meanwhile(emulate):
    # SGLang's shutdown waits up to 60 s, in 0.1 s sleeps, for killed children to exit: were each sleep
    # free, the 60 virtual seconds would pass before the kernel had reaped them
    emulate()
    wall, t0 = _real_perf_counter(), time.monotonic()
    for _ in range(300):
        time.sleep(0.1)
    assert time.monotonic() - t0 == pytest.approx(30.0)  # the real pauses stay off the virtual clock
    assert _real_perf_counter() - wall >= 300 * 1e-3  # 1 % of each sleep, at most 1 ms, in real time


def test_timed_waits_in_a_worker_time_out_in_virtual_time_while_main_sleeps(emulate):
    emu = emulate()
    seen = {}

    def worker():
        q, ev = queue.Queue(), threading.Event()
        try:
            q.get(timeout=5)
        except queue.Empty:
            seen["queue"] = time.monotonic() - t0
        seen["event"] = ev.wait(timeout=3)
        seen["event_at"] = time.monotonic() - t0

    t0 = time.monotonic()
    wall = _real_perf_counter()
    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(10)
    seen["main"] = time.monotonic() - t0
    thread.join(timeout=10)
    assert seen == {"queue": 5.0, "event": False, "event_at": 8.0, "main": 10.0}
    assert emu.clock.jumps >= 3
    assert _real_perf_counter() - wall < 1.0


def test_a_consumer_sees_each_item_at_the_virtual_time_it_was_put(emulate):
    emulate()
    q: queue.Queue = queue.Queue()
    seen = []
    t0 = time.monotonic()

    def producer():
        for i in range(3):
            time.sleep(1)
            q.put(i)

    def consumer():
        for _ in range(3):
            item = q.get()
            seen.append((item, time.monotonic() - t0))

    wall = _real_perf_counter()
    _run(producer, consumer)
    assert seen == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert _real_perf_counter() - wall < 1.0


def test_an_event_set_by_another_thread_wakes_its_waiter_at_that_virtual_time(emulate):
    emulate()
    ev = threading.Event()
    seen = []
    t0 = time.monotonic()

    def setter():
        time.sleep(2.5)
        ev.set()

    def waiter():
        seen.append(ev.wait(timeout=60))
        seen.append(time.monotonic() - t0)

    _run(setter, waiter)
    assert seen == [True, 2.5]


def test_asyncio_sleep_jumps_the_loop_clock(emulate):
    emulate()

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(50)
        await asyncio.gather(asyncio.sleep(1), asyncio.sleep(2))
        return loop.time() - start

    wall = _real_perf_counter()
    assert asyncio.run(main()) == 52.0
    assert _real_perf_counter() - wall < 0.5


@pytest.mark.parametrize("busy", ["device", "host"])
def test_a_sleeper_wakes_at_its_deadline_while_an_actor_computes_past_it(emulate, busy):
    """The worker's 3 s of work crosses the main thread's deadline: main wakes at 1.0, not at 3.0."""
    emu = emulate(device={"aten::mm": 1.0}) if busy == "device" else emulate(host={"aten::mm": 0.5})
    _mm()  # the main thread is an engine thread too (an actor)
    torch.cuda.synchronize()
    t0 = time.monotonic()
    done = threading.Event()
    seen = {}

    def worker():
        time.sleep(0.25)  # start computing after main has gone to sleep
        for _ in range(3 if busy == "device" else 6):
            _mm()
        torch.cuda.synchronize()
        seen["worker"] = time.monotonic() - t0
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(1.0)
    seen["main"] = time.monotonic() - t0
    assert done.wait(timeout=60)
    thread.join(timeout=10)
    assert seen == {"main": 1.0, "worker": 3.25}
    assert emu.clock.stalls == 0


def test_an_actor_that_keeps_launching_is_never_jumped_past(emulate):
    """However long the engine computes in real time, a sleeper waits until the engine's clock gets there."""
    emu = emulate(host={"aten::add": 1e-8})  # millions of launches in the loop below stay short of 1 s
    x = torch.empty(64, 64, device="cuda") + 1
    woke = []
    t0, ops = time.monotonic(), 0
    sleeper = threading.Thread(target=lambda: (time.sleep(1.0), woke.append(time.monotonic() - t0)))
    sleeper.start()
    wall = _real_perf_counter()
    while _real_perf_counter() - wall < _ACTOR_GRACE + 0.2:  # longer than a silent actor is trusted
        x = x + 1
        ops += 1
    assert woke == []
    assert time.monotonic() - t0 == pytest.approx(ops * 1e-8)
    sleeper.join()
    assert woke == [pytest.approx(1.0)]
    assert emu.clock.stalls == 0


def test_an_actor_busy_in_python_of_its_own_holds_time_however_long_it_is_silent(emulate, monkeypatch):
    """vLLM builds its block pool (millions of Python objects) between launches: no contact with the clock
    for minutes, yet it is working, and a sleeper must not be woken past it."""
    monkeypatch.setattr(clock, "_ACTOR_GRACE", 0.1)
    monkeypatch.setattr(clock, "_GRACE", 0.1)
    emu = emulate()
    _mm()  # an actor
    woke = []
    t0 = time.monotonic()
    sleeper = threading.Thread(target=lambda: (time.sleep(1.0), woke.append(time.monotonic() - t0)))
    sleeper.start()
    wall, n = _real_perf_counter(), 0
    while _real_perf_counter() - wall < 1.0:  # ten times longer than a silent actor is trusted
        n += 1
    assert woke == []
    time.sleep(2.0)
    sleeper.join()
    assert woke == [1.0]
    assert emu.clock.stalls == 0


def test_a_thread_blocked_where_the_emulator_cannot_see_lets_time_move_on_and_is_counted(
    emulate, monkeypatch
):
    monkeypatch.setattr(clock, "_GRACE", 0.1)
    emu = emulate()
    read_end, write_end = os.pipe()
    reader = threading.Thread(target=lambda: (time.monotonic(), os.read(read_end, 1)), name="pipe-reader")
    reader.start()
    t0 = time.monotonic()
    time.sleep(5.0)  # the reader sits in a C-level read: after the grace it no longer holds time back
    assert time.monotonic() - t0 == 5.0
    os.write(write_end, b"x")
    reader.join(timeout=10)
    os.close(read_end), os.close(write_end)
    assert emu.clock.stalls >= 1 and emu.clock.stalled_threads["pipe-reader"] >= 1


def test_a_thread_pool_runs_a_task_at_the_virtual_time_it_was_submitted(emulate):
    emu = emulate()
    stop = threading.Event()

    def ticker():  # someone else is waiting on a timer all along
        while not stop.is_set():
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    lags = []
    with ThreadPoolExecutor(1) as pool:
        for _ in range(10):
            sent = time.monotonic()
            lags.append(pool.submit(time.monotonic).result() - sent)
            time.sleep(0.01)
    stop.set()
    thread.join()
    assert lags == [0.0] * 10
    assert emu.clock.stalls == 0


def test_asyncio_waits_on_threads_in_virtual_time(emulate):
    emulate()

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.to_thread(time.sleep, 5)
        after_thread = loop.time() - start
        done = loop.create_future()

        def later():
            time.sleep(2)
            loop.call_soon_threadsafe(done.set_result, time.monotonic() - start)

        threading.Thread(target=later).start()
        return after_thread, await done, loop.time() - start

    wall = _real_perf_counter()
    assert asyncio.run(main()) == (5.0, 7.0, 7.0)
    assert _real_perf_counter() - wall < 0.5


def _workload(emulate) -> tuple[list, list, float]:
    """Requests arrive from a thread; the main thread serves each with a few ops; everything is logged."""
    emu = emulate(
        device={"aten::mm": 2e-3, "aten::add": 1e-4},
        host={"aten::mm": 1.3e-5, "aten::add": 7e-6, "cudaEventRecord": 5e-6},
        launch_latency=4.7e-6,
        sync_latency=3.1e-6,
    )
    requests: queue.Queue = queue.Queue()
    served = []
    x = torch.empty(64, 64, device="cuda")
    x = x + 1  # the engine thread has launched before requests arrive (an actor: time waits for it)

    def arrivals():
        for i in range(5):
            time.sleep(0.0037 * (i + 1))
            requests.put(i)
        requests.put(None)

    thread = threading.Thread(target=arrivals)
    thread.start()
    while (item := requests.get(timeout=1.0)) is not None:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(item + 1):
            x = (x @ x) + 1
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        x[0, 0].item()
        served.append((item, emu.clock.now, start.elapsed_time(end)))
    thread.join(timeout=10)
    ops = [row[1:6] for row in emu.ops]
    now = emu.clock.now
    emu.deactivate()
    return served, ops, now


def test_a_deterministic_run_is_bit_identical_when_repeated(emulate):
    first = _workload(emulate)
    second = _workload(emulate)
    assert len(first[0]) == 5 and len(first[1]) > 20
    assert first == second


def test_an_observer_reads_the_instant_it_was_woken_however_long_it_really_runs(emulate):
    # An observer (a thread that never launches device work) consumes no virtual time: however slow it is
    # in real time, it reads the instant it woke, and the deadline it sets next counts from there.
    emulate()
    seen = []

    def observer():
        time.sleep(1.0)
        seen.append(time.monotonic())
        busy_until = _real_perf_counter() + 0.05
        while _real_perf_counter() < busy_until:  # real work, no virtual time
            pass
        seen.append(time.monotonic())
        time.sleep(0.5)
        seen.append(time.monotonic())

    t0 = time.monotonic()
    worker = threading.Thread(target=observer)
    worker.start()
    worker.join()
    assert [s - t0 for s in seen] == [1.0, 1.0, 1.5]


def test_an_engine_woken_by_an_observer_moves_time_on_only_once_the_observer_waits_again(emulate):
    # A server loop (an observer) hands a request to the engine's worker and goes on answering it, in real
    # time. The worker's step may not move the clock on meanwhile: the token it hands back would find the
    # loop busy, and the loop would read it at the request's arrival, before the step that made it ended.
    emulate(device={"aten::mm": D})
    _mm()  # its signature is cached: the engine's step is quick in real time
    request, token = threading.Event(), threading.Event()
    seen = {}

    def engine():
        request.wait()
        _mm()
        torch.cuda.synchronize()
        seen["handed"] = time.monotonic()
        token.set()

    def server():
        time.sleep(1.0)
        seen["arrived"] = time.monotonic()
        request.set()
        busy_until = _real_perf_counter() + 0.05
        while _real_perf_counter() < busy_until:  # still answering the request: real work, no virtual time
            pass
        token.wait()
        seen["read"] = time.monotonic()

    _run(engine, server)
    assert seen["read"] == seen["handed"] == pytest.approx(seen["arrived"] + D, abs=1e-9)


def test_wall_mode_counts_the_serving_codes_time_between_ops_not_the_emulators(emulate):
    emu = emulate(host_time="wall")
    # measured at activation: torch's subclass dispatch around the emulator's handler, per op
    assert 1e-6 < emu.clock.leak < 2e-4
    a = torch.empty(64, 64, device="cuda")
    b = a @ a  # the thread becomes a clock participant; the signature is cached
    counted = emu.clock.counted
    for _ in range(2000):
        b = a @ a + b
    # a loop of nothing but ops: without the subtraction each op would count about `leak` of its own
    per_op = (emu.clock.counted - counted) / 4000
    print(f"leak {emu.clock.leak * 1e6:.1f} us, counted {per_op * 1e6:.2f} us per op")
    assert per_op < emu.clock.leak


def test_the_first_step_after_the_engine_sat_idle_is_slowed_by_the_profiles_wake_factor(emulate):
    # a profile that measured its wake-up steps 2x slower
    emu = emulate(device={"aten::mm": D}, host={"aten::mm": D}, cost_extra={"wake_factor": 2.0})

    def step() -> float:
        emu.iteration_start("decode", 1, 1, 1)
        _mm()
        torch.cuda.synchronize()
        emu.iteration_end()
        row = emu.iterations[-1]
        return row["host_end"] - row["host_start"]

    first, busy = step(), step()  # no step before the first: nothing to wake from
    time.sleep(0.5)
    woken, after = step(), step()
    # host cost and kernel overlap: a step takes D, a woken one 2 D (both stretched by the factor)
    assert first == pytest.approx(D) and busy == pytest.approx(D)
    assert woken == pytest.approx(2 * D)
    assert after == pytest.approx(D)


def test_host_time_per_request_grows_with_the_requests_in_the_step(emulate):
    # a profile whose serving code spends 1 µs per request after each op (on top of 10 µs)
    emu = emulate(host={"aten::mm": 1e-5}, cost_extra={"host_per_request": lambda key: 1e-6})
    a = torch.empty(64, 64, device="cuda")

    def step(requests: int) -> float:
        emu.iteration_start("decode", requests, requests, requests)
        t0 = time.perf_counter()
        a @ a
        spent = time.perf_counter() - t0
        emu.iteration_end()
        return spent

    assert step(1) == pytest.approx(1.1e-5)
    assert step(8) == pytest.approx(1.8e-5)
    t0 = time.perf_counter()
    a @ a  # between steps: other code (the scheduler's), no per-request term
    assert time.perf_counter() - t0 == pytest.approx(1e-5)


def test_on_a_synchronous_device_the_host_waits_out_each_op_and_what_it_leaves_behind(emulate):
    emulate(
        device={"aten::mm": D},
        host={"aten::mm": 1e-5},
        cost_extra={"synchronous": True, "host_slope": lambda key: 0.25},  # a CPU profile's host line
    )
    a = torch.empty(64, 64, device="cuda")
    t0 = time.perf_counter()
    a @ a
    assert time.perf_counter() - t0 == pytest.approx(1e-5 + D * 1.25)


def test_loopback_bytes_read_by_another_thread_before_the_send_returns_are_not_left_in_flight(emulate):
    # A server and its load generator on loops of their own (transformers serve 5.25 runs uvicorn in its own
    # thread): the reader may take the bytes before the sender's send returns. Counted after sending, those
    # bytes stayed "in flight" for good, and every idle loop then waited 50 ms of real time for them.
    import socket

    from replayer.timewarp import _Loopback

    emulate()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    rounds, size = 300, 64

    def reader():
        got = 0
        while got < rounds * size:
            got += len(server.recv(65536))

    def writer():
        for _ in range(rounds):
            client.sendall(b"x" * size)

    _run(reader, writer)
    for s in (server, client, listener):
        s.close()
    assert _Loopback.in_flight == 0


def test_time_does_not_jump_while_loopback_bytes_wait_for_a_reader_slow_to_wake(emulate):
    # transformers serve 5.25: the load generator sends a request to the server's loop (its own thread), then
    # sleeps until the next arrival. On a loaded machine the server's thread may not run for a while after
    # the bytes land; had time jumped to the next arrival meanwhile, the server would read the request then.
    import selectors
    import socket

    emu = emulate()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    read_at = []

    def reader():
        def slow(seconds):  # the thread gets the CPU 0.3 s (real) after the bytes landed
            if sel.select(seconds):
                _real_sleep(0.3)
                return True
            return False

        emu.clock.block(None, None, wait=slow)
        server.recv(64)
        read_at.append(time.monotonic())

    def sender():
        _real_sleep(0.05)  # the reader blocks first
        client.sendall(b"GET")
        time.sleep(1.0)  # the next arrival

    t0 = time.monotonic()
    _run(reader, sender)
    for s in (server, client, listener):
        s.close()
    assert [t - t0 for t in read_at] == [0.0]


def test_loopback_bytes_nobody_reads_hold_time_back_for_a_moment_only(emulate):
    import socket

    from replayer.timewarp import _LOOPBACK_HOLD

    emulate()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.sendall(b"never read")
    wall, t0 = _real_perf_counter(), time.monotonic()
    time.sleep(5.0)
    waited = _real_perf_counter() - wall
    for s in (server, client, listener):
        s.close()
    assert time.monotonic() - t0 == 5.0
    assert 0.5 * _LOOPBACK_HOLD < waited < 3 * _LOOPBACK_HOLD


def test_loopback_bytes_to_another_process_are_not_waited_for(emulate):
    import socket
    import subprocess
    import sys

    from replayer.timewarp import _Loopback

    serve = (
        "import socket, sys; l = socket.create_server(('127.0.0.1', 0)); print(l.getsockname()[1]); "
        "sys.stdout.flush(); c, _ = l.accept(); sys.stdin.read()"
    )
    other = subprocess.Popen([sys.executable, "-c", serve], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    port = int(other.stdout.readline())
    emulate()
    try:
        theirs = socket.create_connection(("127.0.0.1", port))
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        assert _Loopback.counts(ours) and not _Loopback.counts(theirs)
        theirs.sendall(b"never read")
        wall = _real_perf_counter()
        time.sleep(5.0)
        assert _real_perf_counter() - wall < 0.5
        for s in (theirs, ours, listener):
            s.close()
    finally:
        other.kill()
        other.wait()
