"""The virtual clock: host time, per-stream device time, and the threads that move them.

Semantics (DESIGN.md, "Clock semantics"): a launch at host time H on stream s starts at
max(S_s, H + launch latency) and ends d later; host-blocking points set H = max(H, S_s).

Threads. A thread that launches device work is an *actor*; one that only reads the clock or sleeps
is an *observer*. Virtual time may jump over idle time only when every actor is blocked in a wait the
emulator sees (sleep, a condition wait, an idle event loop) and every observer is blocked or has been
silent for a moment. When an actor's clock passes a sleeper's deadline, the sleeper runs first and the
actor waits until it blocks again: events happen in virtual-time order, whatever the real scheduling,
which is what makes `deterministic` runs bit-identical.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

# Real time (s) a silent observer may keep the clock from jumping, and a handing-off actor waits
# for a woken thread that went silent (it may be blocked where the emulator cannot see).
_GRACE = 1.0
# Real time (s) after which a silent actor counts as blocked where the emulator cannot see (a C-level
# lock, a socket): a safety net against deadlock, counted in `stalls`.
_ACTOR_GRACE = 10.0
# Real time (s) between re-checks of a blocked thread; shorter when other processes share the time
# (replayer.tree), since a jump or a message from them is seen only at a re-check.
_POLL = 0.01
# The share of real time a silent thread must spend on the CPU to count as working (Clock._progressing).
_WORKING = 0.25
_TREE_POLL = 0.001
_TREE_RECHECK = 0.05  # real seconds between decisions on a shared time that has not changed

_real_monotonic = time.monotonic
_get_ident = threading.get_ident
_real_perf_counter = time.perf_counter
# The clock's own condition must not go through the time warp's patched wait / notify.
_real_wait = threading.Condition.wait
_real_notify = threading.Condition.notify


def _notify_all(cv: threading.Condition) -> None:
    _real_notify(cv, len(cv._waiters))


@dataclass(eq=False)
class _Thread:
    thread: threading.Thread
    actor: bool = False
    blocked: bool = False
    deadline: float | None = None
    wake: threading.Lock | None = None
    timed_out: bool = False
    last_contact: float = 0.0
    last_exit: float = 0.0
    stream: int = 0
    capture: object = None  # the CUDA graph this thread is capturing into
    woken: list = field(default_factory=list)  # threads this actor woke, to run before it goes on
    # An observer's own time: the virtual instant it was woken. It consumes no time while it runs, so
    # what it reads and the deadlines it sets do not depend on how fast it is scheduled for real.
    local: float | None = None
    cpu_seen: tuple | None = None  # (real time, its CPU time) when a silent thread was last looked at


@dataclass(eq=False)
class Pending:
    """A stream's time after a collective that waits for other ranks: max(M + a, b), where M, the latest
    rank's arrival, is not known yet. Later launches keep the form (a kernel of duration d on it gives
    max(M + a + d, max(b, its host time + launch latency) + d)); `resolve` asks the other ranks for M only
    when someone needs a concrete time: a host sync, an event, the stream's next collective."""

    resolve: object  # () -> M, blocking until every rank has arrived
    a: float
    b: float = float("-inf")
    m: float | None = None  # M, once resolved
    source: object = None  # what M is the end of (replayer.distributed chains collectives on it)

    def at(self, a: float, b: float) -> float:
        """A time of the form max(M + a, b), resolving M if nobody has yet."""
        if self.m is None:
            self.m = self.resolve()
        return max(self.m + a, b)


def concrete(t) -> float:
    """A logged device time: a float, or (Pending, a, b) for a launch behind a collective, resolved since."""
    return t if type(t) is not tuple else t[0].at(t[1], t[2])


@dataclass(order=True)
class _Sleeper:
    deadline: float
    seq: int
    state: _Thread = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class Clock:
    """Virtual host time, per-stream device times and the scheduling of participant threads."""

    def __init__(self, launch_latency: float = 5e-6, wall: bool = False):
        self.now = 0.0  # host time H, seconds since emulation start
        self.streams: dict[int, float] = {0: 0.0}
        self.launch_latency = launch_latency
        self.wall = wall
        self.leak = 0.0  # wall mode: real seconds per op around the emulator's handler (`Emulator.activate`)
        self._collect_start = 0.0  # when the running garbage collection began (`collecting`)
        self.counted = 0.0  # wall mode: real seconds counted as the serving code's, between ops
        self.jumps = 0
        self.jumped = 0.0  # virtual seconds skipped while everyone waited
        self.stalls = 0  # hand-offs or jumps that needed the real-time grace
        self.stalled_threads: Counter[str] = Counter()  # who was silent at those jumps
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._threads: dict[int, _Thread] = {}
        self._heap: list[_Sleeper] = []
        self._seq = itertools.count()
        self.pending: dict[int, Pending] = {}  # streams behind a collective that other ranks decide
        self._held = 0  # threads inside slow emulator work (see `hold`)
        self._sending = 0  # threads waiting for a message of theirs to be taken (see `sending`)
        self._starting = 0  # threads being started: not registered yet, but about to run
        self.tree = None  # replayer.tree.Tree: the time shared with an engine's other processes
        self._tree_seen = (-1, 0.0)  # the tree's change count and the real time at our last decision
        self.worked = False  # some thread launched device work
        self.captures = 0  # threads capturing a CUDA graph now
        # In a shared time: (t) -> None, called when an actor's host waits for the device (host time t then),
        # for the other processes to catch up to t meanwhile (Tree.catch_up).
        self.synced = None
        # () -> bool: whether something sent inside this process is still on its way to one of its threads
        # (loopback bytes, timewarp.py): the reader is about to run, so time may not jump.
        self.on_its_way = _nothing

    # -- threads -------------------------------------------------------------------------------

    def _me(self) -> _Thread:
        ident = threading.get_ident()
        st = self._threads.get(ident)
        # The OS reuses the idents of finished threads: an entry for a dead thread is not ours.
        if st is None or st.thread is not threading.current_thread():
            st = self._register(threading.current_thread(), ident)
        return st

    def _register(self, thread: threading.Thread, ident: int) -> _Thread:
        st = _Thread(thread, last_contact=_real_monotonic())
        st.last_exit = st.last_contact
        self._threads[ident] = st
        if self.tree is not None:
            self.tree.busy()
        return st

    def start_thread(self, thread: threading.Thread, real_start) -> None:
        """Start `thread` (with the real `Thread.start`) so that time cannot jump before it is known.

        The starter waits for the new thread in a virtual wait, and the new thread meets the clock only
        when it first reads or waits: without this, time could run ahead while it is being born.
        """
        with self._cv:
            self._starting += 1
        try:
            real_start(thread)
        finally:
            with self._cv:
                self._starting -= 1
                ident = thread.ident
                if ident is not None and thread.is_alive():
                    st = self._threads.get(ident)
                    if st is None or st.thread is not thread:
                        self._register(thread, ident)

    def current_stream(self) -> int:
        return self._me().stream

    def set_stream(self, stream: int) -> None:
        self._me().stream = stream
        self.streams.setdefault(stream, self.now)

    # -- host time -----------------------------------------------------------------------------

    def read(self) -> float:
        """Host time as seen by the calling thread."""
        with self._cv:
            st = self._me()
            st.last_contact = _real_monotonic()
            if self.wall and st.actor:
                self._advance_locked(self.now + self._real_since_exit(st), st)
                st.last_exit = _real_monotonic()
            return self._time_of(st)

    def _time_of(self, st: _Thread) -> float:
        t = st.local if st.local is not None and not st.actor else self.now
        if self.tree is not None and not st.actor:
            # an observer also sees what other processes made visible (a front end waiting on an engine)
            t = max(t, self.tree.now())
        return t

    def thread_now(self) -> float:
        """The calling thread's virtual time: its wake-up instant for an observer, else host time."""
        with self._cv:
            return self._time_of(self._me())

    def _real_since_exit(self, st: _Thread) -> float:
        return max(0.0, _real_monotonic() - st.last_exit)

    def enter(self) -> _Thread:
        """Start of emulator work on the calling thread: in wall mode, account the serving code's time."""
        st = self._me()
        if self.wall and st.actor:
            dt = self._real_since_exit(st) - self.leak
            if dt > 0:
                self.counted += dt
                self.advance(dt)
        return st

    def leave(self, st: _Thread) -> None:
        """End of emulator work: the time until the next `enter` is the serving code's own."""
        st.last_exit = st.last_contact = _real_monotonic()

    def collecting(self, phase: str, info: dict) -> None:
        """A `gc.callbacks` hook for wall mode: a garbage collection that pauses the serving code is not its
        time. Most of what is collected is the emulator's (a virtual tensor is several objects where a real
        one is one), and a full collection of a loaded engine takes tens of ms (65 ms on small-llama hf-cb
        here): counted, it made a step's time depend on where the collector happened to run. A
        collection inside emulator work is already out (`leave` sets `last_exit` after it)."""
        if phase == "start":
            self._collect_start = _real_monotonic()
            return
        st = self._threads.get(threading.get_ident())  # no lock: the collector may run while one is held
        if st is not None:
            st.last_exit += _real_monotonic() - self._collect_start

    def advance(self, dt: float) -> None:
        """Move host time forward by dt on the calling thread's behalf."""
        with self._cv:
            self._advance_locked(self.now + dt, self._me())

    def advance_to(self, t: float) -> None:
        with self._cv:
            me = self._me()
            self._advance_locked(t, me)
            now = self.now
        if me.actor and self.synced is not None:
            self.synced(now)

    def _advance_locked(self, target: float, me: _Thread) -> None:
        # Sleepers whose deadline falls before the target run first, each until it blocks again.
        while self._heap and self._heap[0].deadline <= target:
            s = heapq.heappop(self._heap)
            if s.cancelled:
                continue
            self.now = max(self.now, s.deadline)
            self._wake(s.state, timed_out=True)
            if s.state is not me:
                self._await_block(s.state)
        self.now = max(self.now, target)

    def _let_woken_run(self, me: _Thread) -> None:
        """With the lock held: wait until the threads `me` woke have blocked again (or gone quiet)."""
        woken, me.woken = me.woken, []
        for st in woken:
            self._await_block(st)

    def state(self) -> _Thread:
        """The calling thread's state, for `await_block`."""
        with self._cv:
            return self._me()

    def await_block(self, other: _Thread) -> None:
        """Wait (real time) until `other` waits again, or has been silent for a while."""
        with self._cv:
            self._await_block(other)

    def _await_block(self, other: _Thread) -> None:
        while not other.blocked and other.thread.is_alive():
            _real_wait(self._cv, _POLL)
            if not other.blocked and _real_monotonic() - other.last_contact > _GRACE:
                self.stalls += 1
                return

    # -- device time ---------------------------------------------------------------------------

    def launch(self, duration: float, host_cost: float) -> tuple[float, float, int]:
        """Issue `duration` of device work on the calling thread's stream; returns (host, start, stream).

        While the thread captures a CUDA graph nothing runs: start is the offset in the graph and the stream
        comes back as -(stream + 1), so a log can tell captured launches apart at no cost.
        """
        with self._lock:
            me = self._threads.get(_get_ident())
            if me is None:
                me = self._me()
            if me.woken:
                self._let_woken_run(me)
            while self._sending:
                _real_wait(self._cv, _POLL)
            me.actor = True
            self.worked = True
            me.last_contact = _real_monotonic()  # a launching actor is busy, not stalled (_ACTOR_GRACE)
            host = self.now
            stream = me.stream
            graph = me.capture
            if graph is not None:  # captured, not run: the graph's replay will run it
                start = graph.duration
                graph.duration += duration
                graph.ops += 1
                graph.kernels += duration > 0
                stream = -stream - 1  # a captured launch: start is its offset in the graph (see `launch`)
            elif self.pending and stream in self.pending:  # behind a collective: the time stays a form
                p = self.pending[stream]
                b = max(p.b, host + self.launch_latency)
                start = (p, p.a, b)
                if duration > 0:
                    p.a += duration
                    p.b = b + duration
            else:
                start = host + self.launch_latency
                busy = self.streams.get(stream, 0.0)
                if busy > start:
                    start = busy
                if duration > 0:
                    self.streams[stream] = start + duration
            if host_cost > 0:
                target = host + host_cost
                if self._heap and self._heap[0].deadline <= target:
                    self._advance_locked(target, me)
                else:
                    self.now = target
            return host, start, stream

    def begin_capture(self, graph) -> None:
        me = self._me()
        with self._lock:
            self.captures += me.capture is None
            me.capture = graph

    def end_capture(self) -> None:
        me = self._me()
        with self._lock:
            self.captures -= me.capture is not None
            me.capture = None

    def capturing(self):
        """The graph the calling thread captures into, or None (at once when no thread captures)."""
        return self._me().capture if self.captures else None

    def advance_stream(self, stream: int, duration: float) -> float:
        """Append `duration` of work to a stream (a graph replay); returns its start."""
        self._settle((stream,))
        with self._cv:
            start = max(self._stream_time(stream), self.now + self.launch_latency)
            self.streams[stream] = start + duration
            return start

    def stream_time(self, stream: int) -> float:
        """When a stream's work so far ends (other ranks are asked if a collective on it waits for them)."""
        self._settle((stream,))
        with self._cv:
            return self._stream_time(stream)

    def _settle(self, streams) -> None:
        """Ask other ranks for the times pending on these streams, without holding the clock's lock (the
        rank's other threads keep going meanwhile); in wall mode the wait is not the serving code's time."""
        if not self.pending:
            return
        for stream in streams:
            p = self.pending.get(stream)
            if p is not None and p.m is None:
                started = _real_monotonic()
                p.m = p.resolve()
                if self.wall:
                    me = self._me()
                    me.last_exit += _real_monotonic() - started

    def _stream_time(self, stream: int) -> float:
        if self.pending:
            p = self.pending.pop(stream, None)
            if p is not None:
                self.streams[stream] = p.at(p.a, p.b)
        return self.streams.get(stream, 0.0)

    def start_form(self, stream: int) -> tuple[Pending | None, float, float]:
        """When work launched now on `stream` would start, without asking other ranks: (None, 0, t) for a
        time t, or (p, a, b) for max(M + a, b) with M the pending p's unknown time."""
        with self._cv:
            now = self.now + self.launch_latency
            p = self.pending.get(stream) if self.pending else None
            if p is None:
                return None, 0.0, max(self.streams.get(stream, 0.0), now)
            return p, p.a, max(p.b, now)

    def start_time(self, stream: int) -> float:
        """When work launched now on `stream` would start: max(S_s, H + launch latency)."""
        self._settle((stream,))
        with self._cv:
            return max(self._stream_time(stream), self.now + self.launch_latency)

    def end_collective(self, stream: int, end: float | Pending, host_cost: float) -> None:
        """A collective issued on `stream` ends at `end` (or later, once other ranks are known: a Pending);
        issuing it costs the host `host_cost`."""
        with self._cv:
            if isinstance(end, Pending):
                self.pending[stream] = end
            else:
                self.streams[stream] = end
            self._advance_locked(self.now + host_cost, self._me())

    def sync_stream(self, stream: int) -> None:
        """The host waits for a stream's work: H = max(H, S_s)."""
        self.advance_to(self.stream_time(stream))

    def device_time(self) -> float:
        """When the work on every stream so far ends."""
        self._settle(list(self.pending))
        with self._cv:
            for stream in list(self.pending):
                self._stream_time(stream)
            return max(self.streams.values())

    def sync_all(self) -> None:
        self.advance_to(self.device_time())

    def stream_wait(self, waiter: int, until: float) -> None:
        """Stream `waiter` starts no later work before device time `until` (event wait)."""
        self._settle((waiter,))
        with self._cv:
            self.streams[waiter] = max(self._stream_time(waiter), until)

    # -- blocking ------------------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Block the calling thread until host time has advanced by `seconds`."""
        self.block(self.thread_now() + max(0.0, seconds), None)

    def block(self, deadline: float | None, wake: threading.Lock | None, poll=None, wait=None) -> bool:
        """Block until `deadline` (virtual; None = no deadline) or until `wake` is released by a notifier.

        `poll`, called now and then, ends the wait early when it returns True (an event loop's sockets).
        `wait(seconds)`, a real wait that returns True when ready (a socket poll), ends it the moment the
        awaited thing comes. Returns False when the deadline passed first.
        """
        with self._cv:
            me = self._me()
            # A notifier may have released `wake` before we got here (it could not see us waiting yet):
            # then we are not blocked at all, and time must not jump on our account.
            if wake is not None and wake.acquire(False):
                return True
            if deadline is not None and deadline <= self.now:
                return False
            me.blocked, me.deadline, me.timed_out = True, deadline, False
            if not self.wall:
                # Actor until it blocks: a thread that built the model and now only serves HTTP is an
                # observer again, reading the instant it is woken rather than a clock others move.
                me.actor = False
            me.wake = wake if wake is not None else _held_lock()
            sleeper = None
            if deadline is not None:
                sleeper = _Sleeper(deadline, next(self._seq), me)
                heapq.heappush(self._heap, sleeper)
            _notify_all(self._cv)  # a handing-off actor may be waiting for us to block
            self._maybe_jump()
        lock = me.wake
        # In a shared time only a sleeper must look often: another process may move time past its deadline.
        pause = _TREE_POLL if self.tree is not None and deadline is not None else _POLL
        while True:
            if wait is None:
                if lock.acquire(timeout=pause):
                    break
            elif lock.acquire(False):
                break
            elif wait(pause):
                with self._cv:
                    self._wake(me, timed_out=False)
                continue
            with self._cv:
                if not me.blocked:  # woken, lock about to be released
                    continue
                if poll is not None and poll():
                    self._wake(me, timed_out=False)
                    continue
                self._maybe_jump()
        with self._cv:
            if sleeper is not None:
                sleeper.cancelled = True
            me.blocked, me.wake = False, None
            me.last_contact = me.last_exit = _real_monotonic()
            return not me.timed_out

    def unblock(self, ident_lock: threading.Lock) -> None:
        """A notifier released `ident_lock`: its owner is runnable from now on (before it even runs)."""
        with self._cv:
            me = self._threads.get(_get_ident())
            for st in self._threads.values():
                if st.wake is ident_lock and st.blocked:
                    st.blocked = False
                    st.last_contact = _real_monotonic()
                    st.local = self._time_of(me) if me is not None else self.now
                    if self.tree is not None:
                        self.tree.busy()
                    if me is None or st is me:
                        continue
                    if me.actor:
                        # An actor woke it (a token handed to a server loop): the woken thread runs at
                        # this virtual time, before the actor's next launch moves the clock on.
                        me.woken.append(st)
                    elif me not in st.woken:
                        # An observer woke it (a request handed to an engine's worker): the observer does
                        # what it does at this instant before the woken thread's next launch moves the
                        # clock on (a server loop still answering the request when its first token comes
                        # would read that token at the request's arrival).
                        st.woken.append(me)

    def _wake(self, st: _Thread, timed_out: bool) -> None:
        if not st.blocked:
            return
        if self.tree is not None:
            self.now = max(self.now, self.tree.now())
            self.tree.busy()
        st.blocked, st.timed_out = False, timed_out
        st.last_contact = _real_monotonic()
        st.local = max(st.deadline, self.now) if timed_out and st.deadline is not None else self.now
        if st.wake is not None:
            try:
                st.wake.release()
            except RuntimeError:  # already released by a notifier
                pass

    def hold(self) -> None:
        """The calling thread does slow emulator work (a new op signature): time may not jump meanwhile."""
        with self._lock:
            self._held += 1

    def release(self) -> None:
        with self._lock:
            self._held -= 1
            self._me().last_contact = _real_monotonic()

    @contextlib.contextmanager
    def sending(self):
        """The calling thread waits (real time) until a message it sent is taken: meanwhile no device work is
        launched and time does not jump, as if the process sent it from the thread that launches."""
        self.hold()
        with self._cv:
            self._sending += 1
        try:
            yield
        finally:
            with self._cv:
                self._sending -= 1
                _notify_all(self._cv)
            self.release()

    def observe(self, t: float) -> None:
        """Another process made instant `t` visible to this one (a message it sent)."""
        with self._cv:
            self.now = max(self.now, t)

    def _maybe_jump(self) -> None:
        """With the lock held: if nobody can make progress, jump to the earliest deadline."""
        if self.tree is not None and self._wake_due():
            return
        if self._starting or self._held or self.on_its_way():
            return
        now_real = _real_monotonic()
        stalled: list[str] = []
        for st in list(self._threads.values()):
            if not st.thread.is_alive():
                continue
            if st.blocked:
                continue
            if now_real - st.last_contact < (_ACTOR_GRACE if st.actor else _GRACE):
                return
            if self._progressing(st, now_real):
                st.last_contact = now_real  # long Python work of its own (vLLM building its block pool)
                return
            stalled.append(st.thread.name)
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        if self.tree is not None:  # every thread here waits: the processes sharing the time decide
            # Deciding takes the shared lock; a re-check while nothing changed is only a safety net.
            checked = _real_monotonic()
            if self.tree.changes() == self._tree_seen[0] and checked - self._tree_seen[1] < _TREE_RECHECK:
                return
            t = self.tree.idle(self.now, self._heap[0].deadline if self._heap else float("inf"))
            self._tree_seen = (self.tree.changes(), checked)
            if t > self.now:
                self.jumps += 1
                self.jumped += t - self.now
                self.now = t
            self._wake_due()
            return
        if not self._heap:
            return
        s = heapq.heappop(self._heap)
        if s.deadline > self.now:
            self.jumps += 1
            self.jumped += s.deadline - self.now
            self.now = s.deadline
        if stalled:
            self.stalls += 1
            self.stalled_threads.update(stalled)
        self._wake(s.state, timed_out=True)
        _notify_all(self._cv)

    @staticmethod
    def _progressing(st: _Thread, now_real: float) -> bool:
        """Whether a silent thread works (it used a quarter of the CPU time since the last look, or this is
        the first look) rather than waits where the emulator cannot see (a C-level lock or socket: no CPU)."""
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(st.thread.ident))
        except (OSError, TypeError, ValueError, AttributeError):  # the thread ended; no per-thread clocks
            return False
        last = st.cpu_seen
        st.cpu_seen = (now_real, cpu)
        return last is None or cpu - last[1] > _WORKING * (now_real - last[0])

    def _wake_due(self) -> bool:
        """With the lock held, in a shared time: take up the shared time and wake the sleepers it passed."""
        self.now = max(self.now, self.tree.now())
        woke = False
        while self._heap and (self._heap[0].cancelled or self._heap[0].deadline <= self.now):
            s = heapq.heappop(self._heap)
            if not s.cancelled:
                self._wake(s.state, timed_out=True)
                woke = True
        if woke:
            _notify_all(self._cv)
        return woke


def _nothing() -> bool:
    return False


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock
