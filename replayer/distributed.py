"""Distributed emulation: a torch.distributed backend for the virtual device, and causal virtual time.

Code that asks for `nccl` under emulation gets the `revati` backend: a process group whose collectives
move no data, only time. A collective issued at stream time `arrival` on every rank of a group ends, on
every rank, at max(arrivals) + its cost (revati.cost: ring / tree over NVLink or the network, or the
profile's fitted model). Two ways to know the other ranks' arrivals:

- symmetric (`--tp N` in one process): the ranks of pure tensor parallelism do the same work, so this
  process emulates one of them and the others arrive when it does. No coordination at all.
- processes (one process per rank, `torchrun`-style): each rank writes its arrival at collective k of a
  group to the group's c10d Store and reads the others'. A rank blocks only when it needs a concrete time
  that depends on them (replayer.clock.Pending): a host sync, an event, the stream's next collective.
  Ranks that disagree on the sequence (one skipped an all_reduce) are reported with the rank and the
  collective's number; every wait has a timeout naming who did not arrive.

Values: small integer tensors keep shadow values across collectives (a symmetric all_reduce of a count is
the count times the group size; in processes mode the values are exchanged through the store).
"""

from __future__ import annotations

import contextvars
import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from replayer.clock import Pending, _real_monotonic
from replayer.tensor import VTensor, value_allowed
from revati.cost import host_collective_time

BACKEND = "revati"
TIMEOUT_ENV = "REVATI_COLLECTIVE_TIMEOUT"  # seconds a rank waits for the others at one collective
_DEFAULT_TIMEOUT = 300.0
_POLL = 5.0  # seconds between a waiting rank's checks whether the missing ones finished
_BATCH = 64  # announcements a rank holds back at most before sending them in one round trip


class CollectiveError(RuntimeError):
    """Ranks that do not meet: a mismatched sequence, a rank that never arrives or finished early."""


@dataclass
class Topology:
    """What this process stands for: one rank of a world, alone (symmetric) or beside the others."""

    world_size: int = 1
    symmetric: bool = True  # one process emulates one rank; the others are modelled as identical
    gpus_per_node: int = 8
    collectives: int = 0  # issued by this process, all groups
    waited: float = 0.0  # real seconds spent waiting for other ranks (coordination cost)
    # The overhead benchmark's baselines: coordinate=False prices collectives on each rank's own arrival,
    # exchanging nothing; price=False makes every collective a no-op (no cost, no clock, no values).
    coordinate: bool = True
    price: bool = True


_TOPOLOGY = Topology()


def topology() -> Topology:
    return _TOPOLOGY


def set_topology(t: Topology) -> None:
    global _TOPOLOGY
    _TOPOLOGY = t


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return _DEFAULT_TIMEOUT
    try:
        return float(raw)
    except ValueError:
        raise CollectiveError(f"{TIMEOUT_ENV}={raw!r}: expected seconds, e.g. 60") from None


# -- coordination ------------------------------------------------------------------------------------


class Coordinator:
    """Arrival times at one group's collectives, exchanged through the group's c10d Store.

    A rank announces each collective without waiting: its arrival is a time, or — when its stream still
    waits for an earlier collective k of the group — the form max(end(k) + a, b). End times are worked
    out in order, for all collectives up to the one needed, from one fetch of every rank's entries; only
    then does a rank wait, and only for ranks that have not announced yet.

    Keys (under the group's store prefix): `c/K/R` = rank R's arrival at collective K, with what it called;
    `p/S-D/K` and `p/S-D/K/r` = the K-th send from S to D and its receive; `done/R` = R's count at exit.
    """

    def __init__(self, store: dist.Store, rank: int, size: int, name: str):
        self.store, self.rank, self.size, self.name = store, rank, size, name
        self.seq = 0
        self.p2p: dict[tuple[int, int], int] = {}
        self.timeout = _timeout()
        self.whats: dict[int, str] = {}  # what this rank called at collective k
        self.durations: dict[int, float] = {}
        self.ends: dict[int, float] = {}  # when collective k ended on every rank
        self.values: dict[int, list] = {}  # each rank's values at collective k, where they were sent
        self._low = 0  # every collective below has its end worked out
        self._unsent: list[tuple[str, str]] = []  # announcements not in the store yet (see `_flush`)
        self._lock = threading.Lock()  # engines issue collectives from more than one thread
        self._resolving = threading.Lock()
        _COORDINATORS.append(self)

    def arrive(
        self, what: str, duration: float, arrival: float, value: torch.Tensor | None = None,
        after: int = -1, a: float = 0.0,
    ) -> int:  # fmt: skip
        """Announce this rank's arrival at its next collective, at `arrival` — or, with `after`, at
        max(end(after) + a, arrival) — without waiting; returns the collective's number."""
        form = f"{after}:{a!r}:{arrival!r}" if after >= 0 else repr(arrival)
        with self._lock:
            k = self.seq
            self.seq += 1
            self.whats[k], self.durations[k] = what, duration
            self._unsent.append((f"c/{k}/{self.rank}", _payload(what, form, value)))
            full = len(self._unsent) >= _BATCH
        if full:
            self._flush()
        return k

    def _flush(self) -> None:
        """Send the announcements held back: one round trip for many collectives."""
        with self._lock:
            unsent, self._unsent = self._unsent, []
        if unsent:
            keys, values = zip(*unsent, strict=True)
            self.store.multi_set(list(keys), list(values))

    def end(self, k: int) -> float:
        """When collective k ends on every rank: the latest arrival plus its duration. Blocks until every
        rank has announced it (and the collectives before it)."""
        with self._resolving:  # two threads may ask at once
            if k not in self.ends:
                self._resolve(k)
            return self.ends[k]

    def meet(self, k: int) -> list:
        """Every rank's values at collective k, in rank order (None where a rank sent none); once."""
        self.end(k)
        return self.values.pop(k, [None] * self.size)

    def _resolve(self, upto: int) -> None:
        todo = [j for j in range(self._low, upto + 1) if j not in self.ends]
        n = self.size
        keys = [f"c/{j}/{r}" for j in todo for r in range(n)]
        self._wait(keys)
        raws = self.store.multi_get(keys)
        for i, j in enumerate(todo):
            rows = [_parse(raw) for raw in raws[i * n : (i + 1) * n]]
            arrivals = []
            for r, (other, form, _) in enumerate(rows):
                if not _same_call(other, self.whats[j]):
                    raise CollectiveError(
                        f"ranks disagree at collective #{j} of group {self.name}: rank {self.rank} calls "
                        f"{self.whats[j]}, rank {r} calls {other} (did a rank skip or add a collective?)"
                    )
                arrivals.append(self._arrival(form))
            self.ends[j] = max(arrivals) + self.durations.pop(j)
            self.whats.pop(j)
            if any(v is not None for _, _, v in rows):
                self.values[j] = [v for _, _, v in rows]
        while self._low in self.ends:
            self._low += 1

    def _arrival(self, form: str) -> float:
        if ":" not in form:
            return float(form)
        after, a, b = form.split(":")
        return max(self.ends[int(after)] + float(a), float(b))

    def send(self, peer: int, what: str, arrival: float, value: torch.Tensor | None) -> str:
        k = self._next_p2p(self.rank, peer)
        key = f"p/{self.rank}-{peer}/{k}"
        self._flush()
        self.store.set(key, _payload(what, repr(arrival), value))
        return key

    def recv(self, peer: int, what: str, arrival: float) -> str:
        k = self._next_p2p(peer, self.rank)
        key = f"p/{peer}-{self.rank}/{k}"
        self.store.set(key + "/r", _payload(what, repr(arrival), None))
        return key

    def other_side(self, key: str, sender: bool, what: str) -> tuple[float, torch.Tensor | None]:
        """The peer's (arrival, value) at a send / receive pair."""
        src, dst = (int(x) for x in key.split("/")[1].split("-"))
        theirs = key + "/r" if sender else key
        self._wait([theirs])
        other, arrival, value = _parse(self.store.get(theirs))
        if other.split(" ")[1:] != what.split(" ")[1:]:
            raise CollectiveError(
                f"send / receive {key} of group {self.name}: "
                f"rank {src} sends {other if not sender else what}, "
                f"rank {dst} receives {what if not sender else other}"
            )
        return float(arrival), value

    def finish(self) -> None:
        """This rank is done: ranks still waiting for it fail at once instead of at the timeout."""
        try:
            self._flush()
            self.store.set(f"done/{self.rank}", str(self.seq))
        except Exception:  # noqa: BLE001 - the store may be gone with the launcher; nothing left to tell
            pass

    def _next_p2p(self, src: int, dst: int) -> int:
        k = self.p2p.get((src, dst), 0)
        self.p2p[(src, dst)] = k + 1
        return k

    def _wait(self, keys: list[str]) -> None:
        for coord in _COORDINATORS:  # every group's: a rank never waits while others wait for what it holds
            coord._flush()
        topo = topology()
        started = _real_monotonic()
        try:
            while True:
                if self.store.check(keys):  # usually there already: one round trip
                    return
                left = self.timeout - (_real_monotonic() - started)
                try:
                    self.store.wait(keys, timedelta(seconds=max(0.05, min(_POLL, left))))
                    return
                except (RuntimeError, dist.DistError):
                    pass
                missing = [k for k in keys if not self.store.check([k])]
                what = self._describe(missing[0]) if missing else "a collective"
                ranks = sorted({_rank_of(k) for k in missing})
                for r in ranks:
                    if self.store.check([f"done/{r}"]):
                        count = self.store.get(f"done/{r}").decode()
                        raise CollectiveError(
                            f"rank {self.rank} waits at {what} of group {self.name}, but rank {r} finished "
                            f"after {count} collectives: the ranks' collective sequences differ"
                        )
                if _real_monotonic() - started > self.timeout:
                    raise CollectiveError(
                        f"rank {self.rank} waited {self.timeout:.0f} s at {what} of group {self.name}; "
                        f"rank(s) {', '.join(map(str, ranks))} never arrived "
                        f"(set {TIMEOUT_ENV} to wait longer)"
                    )
        finally:
            topo.waited += _real_monotonic() - started

    def _describe(self, key: str) -> str:
        parts = key.split("/")
        if parts[0] == "c":
            k = int(parts[1])
            return f"collective #{k} ({self.whats.get(k, '?')})"
        return f"send / receive {key.removesuffix('/r')}"


_COORDINATORS: list[Coordinator] = []


@dataclass
class _Batch:
    """Send / receive ops being issued together: their shared arrival, and what finishes each."""

    arrival: float
    finishes: list = field(default_factory=list)


_P2P_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("revati_p2p_batch", default=None)


def _same_call(a: str, b: str) -> bool:
    """Two ranks' descriptions of one collective agree: same kind and size (an all-to-all's sizes may
    differ by rank)."""
    return a == b or (a.startswith("all_to_all ") and b.startswith("all_to_all "))


def _rank_of(key: str) -> int:
    parts = key.split("/")
    if parts[0] == "c":
        return int(parts[2])
    src, dst = (int(x) for x in parts[1].split("-"))
    return dst if key.endswith("/r") else src


def _payload(what: str, arrival: str, value: torch.Tensor | None) -> str:
    # Values travel as dtype, shape and hex bytes: data, never pickles.
    if value is None:
        return f"{what}|{arrival}|"
    v = value.contiguous()
    raw = v.view(torch.uint8).numpy().tobytes().hex() if v.numel() else ""
    dims = ",".join(map(str, v.shape))
    return f"{what}|{arrival}|{str(v.dtype).removeprefix('torch.')};{dims};{raw}"


def _parse(raw: bytes) -> tuple[str, str, torch.Tensor | None]:
    """(what, arrival as written, value) of a store entry."""
    what, arrival, value = raw.decode().split("|")
    if not value:
        return what, arrival, None
    dtype, dims, hexed = value.split(";")
    shape = [int(d) for d in dims.split(",")] if dims else []
    data = (
        torch.frombuffer(bytearray(bytes.fromhex(hexed)), dtype=torch.uint8)
        if hexed
        else torch.empty(0, dtype=torch.uint8)
    )
    return what, arrival, data.view(getattr(torch, dtype)).reshape(shape).clone()


# -- the process group -------------------------------------------------------------------------------


def _done_work(result=None) -> dist.Work:
    fut = torch.futures.Future()
    fut.set_result(result)
    return torch._C._distributed_c10d._create_work_from_future(fut)


@dataclass
class _Call:
    """One collective as issued on this rank: what it is, what it reads and writes, how it combines."""

    key: str  # revati::all_reduce, ...
    inputs: list
    outputs: list
    combine: object  # (inputs' values over ranks, in rank order) -> outputs' values, or None
    nbytes: float = 0.0  # set where ranks' own tensors differ in size (gather, scatter)
    blocking: bool = False  # the host waits for it (a barrier)


class VirtualGroup(dist.ProcessGroup):
    """A process group of the virtual device (the `revati` backend); see the module's docstring."""

    def __init__(self, store: dist.Store, rank: int, size: int):
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        self.store = store
        self.coordinator: Coordinator | None = None
        self._ranks: list[int] | None = None
        self._nodes: int | None = None
        self._priced: dict[tuple, tuple] = {}

    # identity ------------------------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    def _get_backend(self, device) -> VirtualGroup:
        """The group is its own backend on every device. (A ProcessGroup subclass that a backend's creator
        returns gets no backend registered; torch 2.14's `batch_isend_irecv` still asks the group's backend
        whether it coalesces sends.)"""
        return self

    @property
    def group_name(self) -> str:
        return dist.distributed_c10d._world.pg_names.get(self, "revati")

    def __repr__(self) -> str:
        mode = "symmetric" if topology().symmetric else "processes"
        return f"VirtualGroup(rank={self._rank}, size={self._size}, {mode})"

    # collectives ---------------------------------------------------------------------------------

    def allreduce(self, tensors, opts=None):
        op = _reduce_op(opts)
        return self._run(_Call("revati::all_reduce", tensors, tensors, _reducer(op)))

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce(self, tensors, opts=None):
        op, root = _reduce_op(opts), getattr(opts, "rootRank", 0)
        combine = _reducer(op) if self._rank == root else (lambda values: None)
        return self._run(_Call("revati::reduce", tensors, tensors if self._rank == root else [], combine))

    def broadcast(self, tensors, opts=None):
        root = getattr(opts, "rootRank", 0)
        return self._run(_Call("revati::broadcast", tensors, tensors, lambda values: values[root]))

    def allgather(self, output_lists, inputs, opts=None):
        outs = [t for lst in output_lists for t in lst]
        return self._run(_Call("revati::all_gather", inputs, outs, _gather_lists(len(inputs))))

    def all_gather_single(self, output, input, opts=None):
        return self._run(_Call("revati::all_gather", [input], [output], _concat))

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        return self._run(_Call("revati::all_gather", inputs, outputs, _concat_each(len(inputs))))

    all_gather_single_coalesced = allgather_into_tensor_coalesced

    def reduce_scatter(self, outputs, input_lists, opts=None):
        op = _reduce_op(opts)
        ins = [t for lst in input_lists for t in lst]
        return self._run(
            _Call("revati::reduce_scatter", ins, outputs, _scatter_lists(len(outputs), self._rank, op))
        )

    def reduce_scatter_single(self, output, input, opts=None):
        op = _reduce_op(opts)
        return self._run(_Call("revati::reduce_scatter", [input], [output], _chunk_of(self._rank, op)))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        op = _reduce_op(opts)
        return self._run(
            _Call("revati::reduce_scatter", inputs, outputs, _chunks_each(len(outputs), self._rank, op))
        )

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    def alltoall(self, outputs, inputs, opts=None):
        return self._run(_Call("revati::all_to_all", inputs, outputs, _exchange(self._rank)))

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        return self._run(_Call("revati::all_to_all", [input], [output], lambda values: None))

    alltoall_base = all_to_all_single

    def gather(self, output_lists, inputs, opts=None):
        root = getattr(opts, "rootRank", 0)
        outs = [t for lst in output_lists for t in lst] if self._rank == root else []
        agreed = self._size * _nbytes(inputs)  # what the root receives: the same figure on every rank
        return self._run(_Call("revati::gather", inputs, outs, _gather_lists(len(inputs)), nbytes=agreed))

    def scatter(self, outputs, input_lists, opts=None):
        root = getattr(opts, "rootRank", 0)

        def combine(values):
            return [values[root][self._rank]] if values[root] else None

        ins = [t for lst in input_lists for t in lst]
        agreed = self._size * _nbytes(outputs)  # what the root sends: the same figure on every rank
        return self._run(_Call("revati::scatter", ins, outputs, combine, nbytes=agreed))

    def barrier(self, opts=None):
        return self._run(_Call("revati::reduce", [], [], lambda values: None, nbytes=4.0, blocking=True))

    def send(self, tensors, dst, tag=0):
        return self._p2p(tensors, dst, sender=True)

    def recv(self, tensors, src, tag=0):
        return self._p2p(tensors, src, sender=False)

    def recv_anysource(self, tensors, tag=0):
        raise CollectiveError(
            "revati: recv from any source is not emulated: name the sending rank (dist.recv(t, src=...))"
        )

    # the engine ----------------------------------------------------------------------------------

    def _run(self, call: _Call) -> dist.Work:
        from replayer.session import current

        emu = current()
        if not topology().price:
            return _done_work(call.outputs)
        return emu.outside(self._issue, emu, call)

    def _issue(self, emu, call: _Call) -> dist.Work:
        topo = topology()
        topo.collectives += 1
        n = self._size
        nbytes = call.nbytes or _full_side(call)
        first = call.inputs[0] if call.inputs else call.outputs[0] if call.outputs else None
        if first is not None and type(first) is not VTensor:
            return self._on_host(emu, call, nbytes)
        features, duration, host, what = self._price(
            emu, call.key, nbytes, first.dtype if first is not None else None
        )
        clock = emu.clock
        if topo.symmetric or not topo.coordinate or n == 1 or clock.capturing() is not None:
            # the other ranks arrive when this one does: a kernel of the collective's duration (in a CUDA
            # graph, replays repeat its captured time)
            emu.collective_launched(call.key, features, duration, host, clock.launch(duration, host))
            _apply_values(call, [_values(call.inputs)] * n if _valued(call.inputs) else None)
            if call.blocking:
                clock.sync_stream(clock.current_stream())
            return _done_work(call.outputs)
        coord = self._coordinator()
        stream = clock.current_stream()
        issued = clock.now
        # values cross only where this rank sends some and every tensor is small (a scatter's receivers,
        # which send none, get none: their outputs' contents become unknown)
        eager = _valued(call.inputs) and all(value_allowed(t.dtype, t.numel()) for t in call.inputs)
        behind, a, start = clock.start_form(stream)
        source = getattr(behind, "source", None)
        if eager or (behind is not None and not (isinstance(source, tuple) and source[0] is coord)):
            start, behind = clock.start_time(stream), None  # values are needed now, or another group's wait
        if behind is None:
            k = coord.arrive(what, duration, start, _flat(_values(call.inputs)) if eager else None)
        else:
            k = coord.arrive(what, duration, start, None, after=source[1], a=a)
        if eager:  # values are needed now: meet the others at once
            end: float | Pending = coord.end(k)
            _apply_values(call, [_unflat(v, call.inputs) for v in coord.meet(k)])
        else:
            end = Pending(lambda: coord.end(k), 0.0, source=(coord, k))
            _apply_values(call, None)
        clock.end_collective(stream, end, host)
        logged = start if behind is None else (behind, a, start)
        emu.collective_launched(call.key, features, duration, host, (issued, logged, stream))
        if call.blocking:
            clock.sync_stream(stream)
        return _done_work(call.outputs)

    def _price(self, emu, key: str, nbytes: float, dtype) -> tuple:
        """(features, device time, host time, description) of a collective, computed once per shape."""
        ckey = (key, nbytes, dtype)
        priced = self._priced.get(ckey)
        if priced is None:
            n = self._size
            features = {"bytes": nbytes, "group_size": float(n), "nodes": float(self._span())}
            duration = emu.cost.device_time(key, features, dtype) if n > 1 else 0.0
            what = f"{key.removeprefix('revati::')} {int(nbytes)}B"
            priced = self._priced[ckey] = (features, duration, emu.cost.host_time(key), what)
        return priced

    def _on_host(self, emu, call: _Call, nbytes: float) -> dist.Work:
        """A collective on host tensors (gloo's work): real values, host time only, no GPU stream."""
        n = self._size
        clock = emu.clock
        cost = host_collective_time(nbytes, n)
        mine = _values(call.inputs)
        if topology().symmetric or not topology().coordinate or n == 1:
            clock.advance(cost)
            _apply_values(call, [mine] * n)
            return _done_work(call.outputs)
        coord = self._coordinator()
        what = f"host {call.key.removeprefix('revati::')} {int(nbytes)}B"
        k = coord.arrive(what, cost, clock.now, _flat(mine))
        clock.advance_to(coord.end(k))
        _apply_values(call, [_unflat(v, call.inputs) for v in coord.meet(k)])
        return _done_work(call.outputs)

    def _p2p(self, tensors, peer: int, sender: bool) -> dist.Work:
        from replayer.session import current

        if topology().symmetric:
            raise CollectiveError(
                "revati: send / recv under symmetric (deduplicated) emulation: pipeline stages differ, so "
                "every rank needs its own process; launch them with `revati emulate --pp N -- python ...` "
                "or torchrun"
            )
        emu = current()
        if not topology().price:
            return _done_work(tensors)
        return emu.outside(self._issue_p2p, emu, tensors, peer, sender)

    def _issue_p2p(self, emu, tensors, peer: int, sender: bool) -> dist.Work:
        topo = topology()
        topo.collectives += 1
        nbytes = _nbytes(tensors)
        features = {"bytes": nbytes, "group_size": 2.0, "nodes": float(self._span([self._rank, peer]))}
        duration = emu.cost.device_time("revati::send_recv", features, tensors[0].dtype if tensors else None)
        host = emu.cost.host_time("revati::send_recv")
        what = f"{'send' if sender else 'recv'} {int(nbytes)}B"
        clock = emu.clock
        stream = clock.current_stream()
        batch = _P2P_BATCH.get()
        arrival = batch.arrival if batch is not None else clock.start_time(stream)
        issued = clock.now
        coord = self._coordinator()
        if not topo.coordinate:
            end: float | Pending = arrival + duration
        else:
            finish = self._post(coord, tensors, peer, sender, what, arrival, duration)
            small = not sender and all(value_allowed(t.dtype, t.numel()) for t in tensors)
            if batch is not None:  # the batch finishes once every op of it is posted
                batch.finishes.append(finish)
                clock.advance(host)
                emu.collective_launched(
                    "revati::send_recv", features, duration, host, (issued, arrival, stream)
                )
                return _done_work(tensors)
            # a small receive may carry values (token ids): take them now; others wait until needed
            end = finish() if small else Pending(finish, 0.0)
        clock.end_collective(stream, end, host)
        emu.collective_launched("revati::send_recv", features, duration, host, (issued, arrival, stream))
        return _done_work(tensors)

    def _post(self, coord, tensors, peer: int, sender: bool, what: str, arrival: float, duration: float):
        """Post one side of a send / receive; returns what finishes it: () -> its end (values applied)."""
        if sender:
            key = coord.send(peer, what, arrival, _flat(_values(tensors)) if _valued(tensors) else None)
            return lambda: max(arrival, coord.other_side(key, True, what)[0]) + duration
        key = coord.recv(peer, what, arrival)
        for t in tensors:  # contents unknown until the sender's are in
            if type(t) is VTensor:
                t._vstorage.value = None

        def finish() -> float:
            theirs, value = coord.other_side(key, False, what)
            _apply_values(_Call("", tensors, tensors, lambda values: values[0]), [_unflat(value, tensors)])
            return max(arrival, theirs) + duration

        return finish

    def run_batch(self, emu, issue) -> list:
        """Send / receive ops issued together (`batch_isend_irecv`): all posted at one arrival, then
        finished, as NCCL runs a batch at once: two ranks that each receive before they send do not wait on
        each other."""
        clock = emu.clock
        stream = clock.current_stream()
        batch = _Batch(clock.start_time(stream))
        token = _P2P_BATCH.set(batch)
        try:
            works = issue()
        finally:
            _P2P_BATCH.reset(token)
        if batch.finishes:  # waiting for the peers is the emulator's time, not the serving code's
            end = emu.outside(lambda: max(finish() for finish in batch.finishes))
            clock.end_collective(stream, end, 0.0)
        return works

    def _coordinator(self) -> Coordinator:
        if self.coordinator is None:
            self.coordinator = Coordinator(self.store, self._rank, self._size, self.group_name)
        return self.coordinator

    def _span(self, ranks: list[int] | None = None) -> int:
        """Nodes a group spans, with ranks placed on nodes in order (gpus_per_node each)."""
        per_node = max(1, topology().gpus_per_node)
        if ranks is not None:
            return len({self._global(r) // per_node for r in ranks})
        if self._nodes is None:
            self._nodes = len({r // per_node for r in self._global_ranks()})
        return self._nodes

    def _global_ranks(self) -> list[int]:
        if self._ranks is None:
            try:
                self._ranks = dist.get_process_group_ranks(self)
            except (RuntimeError, ValueError, KeyError):
                self._ranks = list(range(self._size))
        return self._ranks

    def _global(self, group_rank: int) -> int:
        return self._global_ranks()[group_rank]

    def shutdown(self) -> None:
        if self.coordinator is not None:
            self.coordinator.finish()


# -- values ------------------------------------------------------------------------------------------


def _value_of(t) -> torch.Tensor | None:
    return t.value() if type(t) is VTensor else (t if isinstance(t, torch.Tensor) else None)


def _values(tensors) -> list:
    return [_value_of(t) for t in tensors]


def _valued(tensors) -> bool:
    """Every tensor has a known value (a plain loop: this is on every collective's path)."""
    if not tensors:
        return False
    for t in tensors:
        if type(t) is VTensor:
            if t._value is None or t._vstorage.value is None:
                return False
        elif not isinstance(t, torch.Tensor):
            return False
    return True


def _flat(values: list) -> torch.Tensor | None:
    if not values or any(v is None for v in values):
        return None
    return torch.cat([v.reshape(-1).to(values[0].dtype) for v in values])


def _unflat(flat: torch.Tensor | None, like: list) -> list:
    """`flat` cut back into tensors shaped like `like`'s."""
    if flat is None:
        return [None] * len(like)
    out, at = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[at : at + n].reshape(t.shape).to(t.dtype))
        at += n
    return out


def _apply_values(call: _Call, per_rank: list | None) -> None:
    """Write the combined values into the outputs; where any is unknown, their contents become unknown."""
    results = None
    if (
        per_rank is not None
        and call.combine is not None
        and all(v is not None for values in per_rank for v in values)
    ):
        results = call.combine(per_rank)
    for i, t in enumerate(call.outputs):
        value = results[i] if isinstance(results, list) and i < len(results) else None
        if type(t) is not VTensor:
            if isinstance(t, torch.Tensor) and value is not None:
                t.copy_(value.reshape(t.shape))  # a host tensor holds real data
            continue
        if value is not None and value.numel() == t.numel():
            value = value.reshape(t.shape)  # gathers and reductions combine flat
        if value is not None and t._value is not None and t._value.shape == value.shape:
            t._value.copy_(value)
            t._vstorage.value = True
        elif value is not None and t._value is None and t.numel() * t.element_size() == t._vstorage.nbytes:
            t._value = value.reshape(t.shape).to(t.dtype).clone()  # the whole storage: its value is known now
            t._vstorage.value = True
        else:
            t._vstorage.value = None


def _reduce_op(opts):
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    return getattr(op, "op", op)


def _reduce(stack: list[torch.Tensor], op) -> torch.Tensor:
    R = dist.ReduceOp
    if op == R.SUM:
        return torch.stack(stack).sum(0).to(stack[0].dtype)
    if op == R.AVG:
        return (
            (torch.stack(stack).sum(0) // len(stack)).to(stack[0].dtype)
            if not stack[0].is_floating_point()
            else torch.stack(stack).mean(0)
        )
    if op == R.PRODUCT:
        return torch.stack(stack).prod(0).to(stack[0].dtype)
    if op == R.MIN:
        return torch.stack(stack).amin(0)
    if op == R.MAX:
        return torch.stack(stack).amax(0)
    return stack[0]


def _reducer(op):
    def combine(values):  # values[rank][tensor]
        return [_reduce([values[r][i] for r in range(len(values))], op) for i in range(len(values[0]))]

    return combine


def _concat(values):
    return [torch.cat([v[0].reshape(-1) for v in values])]


def _concat_each(count: int):
    return lambda values: [torch.cat([v[i].reshape(-1) for v in values]) for i in range(count)]


def _gather_lists(count: int):
    # outputs are [input i from rank r] flattened as output_lists[i][r]
    return lambda values: [values[r][i] for i in range(count) for r in range(len(values))]


def _chunk_of(rank: int, op):
    def combine(values):
        total = _reduce([v[0].reshape(-1) for v in values], op)
        return [total.chunk(len(values))[rank]]

    return combine


def _chunks_each(count: int, rank: int, op):
    def combine(values):
        return [
            _reduce([v[i].reshape(-1) for v in values], op).chunk(len(values))[rank] for i in range(count)
        ]

    return combine


def _scatter_lists(count: int, rank: int, op):
    def combine(values):
        n = len(values)  # input_lists[i][r] flattened: values[rank][i * n + r]
        return [_reduce([values[src][i * n + rank] for src in range(n)], op) for i in range(count)]

    return combine


def _exchange(rank: int):
    return lambda values: [values[src][rank] for src in range(len(values))]


def _nbytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _full_side(call: _Call) -> float:
    ins = _nbytes(call.inputs)
    return ins if call.outputs is call.inputs else max(ins, _nbytes(call.outputs))  # in place: one side


# -- activation --------------------------------------------------------------------------------------

_GROUPS: list = []
# Backends that mean the virtual one under emulation: NCCL for device tensors, and gloo, which serving code
# uses beside it for host-side control messages (transformers' continuous batching broadcasts its schedule).
_TAKEN_OVER = ("nccl", "gloo")


def install(patch) -> None:
    """Under emulation, `nccl` and `gloo` (and the default backend for `cuda`) mean the `revati` backend."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _creator, devices=["cuda", "cpu"])
    real_new = dist.Backend.__new__

    def backend_new(cls, name: str):
        if isinstance(name, str) and name.lower() in _TAKEN_OVER:
            name = BACKEND
        return real_new(cls, name)

    patch.set(dist.Backend, "__new__", backend_new)
    patch.set(dist, "is_nccl_available", lambda: True)
    patch.set(dist.distributed_c10d, "is_nccl_available", lambda: True)
    patch.set(
        dist.Backend,
        "default_device_backend_map",
        {**dist.Backend.default_device_backend_map, "cuda": BACKEND},
    )
    real_init = dist.init_process_group

    def init_process_group(
        backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None, **kwargs
    ):
        topo = topology()
        if topo.symmetric and store is None:
            # One process stands for every rank: no rendezvous (env://, tcp://, file://), nobody to wait for.
            init_method = None
            store, rank, world_size = dist.HashStore(), 0, topo.world_size if world_size < 0 else world_size
        return real_init(backend, init_method, timeout, world_size, rank, store, **kwargs)

    patch.set(dist, "init_process_group", init_process_group)
    patch.set(dist.distributed_c10d, "init_process_group", init_process_group)
    real_batch = dist.batch_isend_irecv

    def batch_isend_irecv(p2p_op_list):
        group = p2p_op_list[0].group if p2p_op_list else None
        group = group if group is not None else dist.distributed_c10d._get_default_group()
        if not isinstance(group, VirtualGroup) or topology().symmetric:
            return real_batch(p2p_op_list)
        from replayer.session import current

        emu = current()
        return group.run_batch(emu, lambda: real_batch(p2p_op_list))

    patch.set(dist, "batch_isend_irecv", batch_isend_irecv)
    patch.set(dist.distributed_c10d, "batch_isend_irecv", batch_isend_irecv)

    def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
        # gloo's barrier that names the ranks which did not arrive; gloo groups are this backend here,
        # whose barrier fails by name on a timeout (REVATI_COLLECTIVE_TIMEOUT) already
        return dist.barrier(group)

    patch.set(dist, "monitored_barrier", monitored_barrier)
    patch.set(dist.distributed_c10d, "monitored_barrier", monitored_barrier)


def uninstall() -> None:
    """Tell ranks still waiting that this one is done, and drop the process groups of the emulation."""
    groups, _GROUPS[:] = list(_GROUPS), []
    for g in groups:
        g.shutdown()
    if groups and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError, AssertionError):
            pass


def _creator(store, rank: int, size: int, timeout) -> VirtualGroup:
    """The `revati` backend's creator (torch.distributed.Backend.register_backend)."""
    group = VirtualGroup(store, rank, size)
    _GROUPS.append(group)
    return group
