"""Time warp: the serving code's clocks, sleeps and waits run on virtual time.

`time.time / perf_counter / monotonic` (and `_ns`) read the virtual host clock; `time.sleep`,
condition waits (hence `threading.Event`, `queue.Queue`, futures) and an idle asyncio loop block in
virtual time, so a server waiting for its next request costs no wall time. `threading` and `queue`
bind `time.monotonic` at import; their bindings are patched too. Threads started while emulating are
known to the clock before they first run; `Thread.join` and `queue.SimpleQueue` (thread pools) wait in
virtual time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import multiprocessing.connection
import os
import queue
import selectors
import socket
import threading
import time
import weakref
from itertools import islice
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from replayer.session import Emulator, Patcher

_real = {name: getattr(time, name) for name in ("time", "perf_counter", "monotonic")}
_real_wait = threading.Condition.wait
_real_join = threading.Thread.join
_real_start = threading.Thread.start
_real_sleep = time.sleep
_real_monotonic = _real["monotonic"]
_REAL_SHARE, _REAL_MAX = 0.01, 1e-3  # a virtual sleep also waits this share of itself in real time, at most


BASES_ENV = "REVATI_CLOCK_BASES"  # set by a launcher: every rank's time.time() reads the same instant


def clock_bases() -> dict[str, float]:
    """What time.time / perf_counter / monotonic read at virtual time 0: whole seconds, rounded up (clocks
    never run backwards; differences lose no bits to the base); a launcher's, where it set them."""
    shared = os.environ.get(BASES_ENV)
    if shared:
        try:
            bases = {k: float(v) for k, v in json.loads(shared).items()}
            if set(bases) == set(_real):
                return bases
        except (ValueError, AttributeError):
            pass
    return {name: float(int(real()) + 1) for name, real in _real.items()}


def install(emu: Emulator, patch: Patcher) -> None:
    """Route the time module, condition waits and new asyncio loops through the virtual clock."""
    clock = emu.clock
    bases = clock_bases()

    # Read as the real clocks are, in whole nanoseconds: the same virtual instant, reached by sums in another
    # order (a jump to a deadline, or launches), reads the same however its last bits came out.
    def reader_ns(name):
        base = round(bases[name]) * 1_000_000_000

        def read_ns():
            return base + round(clock.read() * 1e9)

        read_ns.__name__ = name + "_ns"
        return read_ns

    def reader(name):
        read_ns = reader_ns(name)

        def read():
            return read_ns() / 1e9

        read.__name__ = name
        return read

    def sleep(seconds):
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        clock.sleep(seconds)
        # and a little real time, off the clock: a loop that polls the OS for what virtual time cannot see
        # (SGLang waiting up to 60 s, in 0.1 s sleeps, for a killed child to exit) sees it happen
        emu.outside(_real_sleep, min(seconds * _REAL_SHARE, _REAL_MAX))

    def wait(self, timeout=None):
        if not emu.active:
            return _real_wait(self, timeout)
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        saved = self._release_save()
        woken = False
        try:
            if timeout is not None and timeout <= 0:
                woken = waiter.acquire(False)
            else:
                deadline = None if timeout is None else clock.thread_now() + timeout
                woken = clock.block(deadline, waiter)
            return woken
        finally:
            self._acquire_restore(saved)
            if not woken:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def notify(self, n=1):
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        for waiter in list(islice(waiters, n)):
            clock.unblock(waiter)
            try:
                waiter.release()
            except RuntimeError:  # timed out meanwhile
                pass
            try:
                waiters.remove(waiter)
            except ValueError:
                pass

    def join(self, timeout=None):
        if not emu.active or not self.is_alive() or self is threading.current_thread():
            return _real_join(self, timeout)
        deadline = None if timeout is None else clock.thread_now() + timeout
        clock.block(deadline, None, poll=lambda: not self.is_alive())
        if not self.is_alive():
            _real_join(self)

    def start(self):
        if not emu.active:
            return _real_start(self)
        clock.start_thread(self, _real_start)

    for name in ("time", "perf_counter", "monotonic"):
        patch.set(time, name, reader(name))
        patch.set(time, name + "_ns", reader_ns(name))
    patch.set(time, "sleep", sleep)
    patch.set(threading.Condition, "wait", wait)
    patch.set(threading.Condition, "notify", notify)
    patch.set(threading.Thread, "start", start)
    patch.set(threading.Thread, "join", join)
    patch.set(threading, "_time", time.monotonic)
    _install_loopback_accounting(patch)
    emu.clock.on_its_way = _Loopback.on_its_way
    patch.set(queue, "time", time.monotonic)
    # The C SimpleQueue blocks where the clock cannot see (thread pools wait on one for work); the pure
    # Python one waits on a condition, in virtual time. Queues made while emulating get it.
    patch.set(queue, "SimpleQueue", queue._PySimpleQueue)

    def wait_ready(object_list, timeout=None):
        # multiprocessing's wait on pipes and process sentinels (vLLM watches its engine core with one,
        # a second at a time) waits in virtual time. Its own loop re-reads time.monotonic until a timeout
        # passes, which spins while virtual time stands still: readiness is probed with a selector instead.
        ready = _ready(object_list, 0)
        if ready or timeout == 0:
            return ready
        if not emu.active:
            return _ready(object_list, timeout)
        found: list = []

        def probe(seconds: float) -> bool:
            found[:] = _ready(object_list, seconds)
            return bool(found)

        # From the later of the thread's time and the process's: a watcher woken at an early instant would
        # otherwise find its every deadline passed, and spin.
        deadline = None if timeout is None else max(clock.thread_now(), clock.now) + timeout
        clock.block(deadline, None, wait=probe)
        return found or _ready(object_list, 0)

    patch.set(multiprocessing.connection, "wait", wait_ready)
    old_policy = asyncio.get_event_loop_policy()
    real_set_policy = asyncio.set_event_loop_policy
    patch.on_restore(lambda: real_set_policy(old_policy))
    real_set_policy(_VirtualPolicy(emu))

    def set_event_loop_policy(policy):
        # Serving code that installs its own loop policy (SGLang: uvloop, at import) still gets virtual loops:
        # a uvloop loop waits and reads time in C, where the time warp cannot reach.
        if isinstance(policy, _VirtualPolicy):
            real_set_policy(policy)

    patch.set(asyncio, "set_event_loop_policy", set_event_loop_policy)
    patch.set(asyncio.events, "set_event_loop_policy", set_event_loop_policy)

    # Loops made without the policy get virtual ones too: uvicorn's `Server.run` makes its own from a loop
    # factory, `asyncio.SelectorEventLoop` itself, or uvloop's where uvloop is installed (`transformers serve`
    # runs uvicorn so).
    class SelectorLoop(VirtualLoop):
        def __init__(self, selector=None):
            super().__init__(emu)

    patch.set(asyncio, "SelectorEventLoop", SelectorLoop)
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        patch.set(uvloop, "new_event_loop", SelectorLoop)


class _Loopback:
    """Bytes sent over loopback to a socket of this process and not yet received: a server and its load
    generator in this process talk through the kernel, and a byte in flight must arrive at the virtual instant
    it was sent (the loop may not idle, and time may not jump, while one is on its way). Bytes to another
    process are not counted: nothing here waits for them."""

    in_flight = 0
    last_sent = 0.0  # real time of the last counted send
    _lock = threading.Lock()
    _peers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _local: set = set()  # addresses (ip, port) of TCP sockets of this process seen so far

    @classmethod
    def counts(cls, sock) -> bool:
        local = cls._peers.get(sock)
        if local is None:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return False
            try:
                peer, own = tuple(sock.getpeername()[:2]), tuple(sock.getsockname()[:2])
            except OSError:
                return False
            local = cls._peers[sock] = peer[0] in ("127.0.0.1", "::1") and cls._ours(peer, own)
        return local

    @classmethod
    def _ours(cls, peer: tuple, own: tuple) -> bool:
        """Whether `peer` is the address of a socket of this process (its listener or its connection)."""
        cls._local.add(own)
        if peer not in cls._local:
            try:
                cls._local.update(tuple(c.laddr) for c in psutil.Process().net_connections("tcp") if c.laddr)
            except (psutil.Error, OSError):  # no way to tell: count it, as for a peer of ours
                return True
        return peer in cls._local

    @classmethod
    def add(cls, n: int) -> None:
        with cls._lock:
            cls.in_flight = max(0, cls.in_flight + n)
            if n > 0:
                cls.last_sent = _real_monotonic()

    @classmethod
    def on_its_way(cls) -> bool:
        """Whether counted bytes wait for their reader, sent less than _LOOPBACK_HOLD ago (real time): bytes
        that nobody reads (a connection closed before its last bytes were read) hold time back no longer."""
        return cls.in_flight > 0 and _real_monotonic() - cls.last_sent < _LOOPBACK_HOLD


_LOOPBACK_WAIT = 0.05  # s of real time a select waits for counted bytes to reach its own sockets
_LOOPBACK_HOLD = 1.0  # s of real time at most that counted bytes keep time from jumping (`on_its_way`)


def _await_loopback_bytes(sel) -> list:
    waited = 0.0
    while _Loopback.in_flight > 0 and waited < _LOOPBACK_WAIT:
        ready = sel.select(0.001)
        if ready:
            return ready
        waited += 0.001
    return []


def _install_loopback_accounting(patch: Patcher) -> None:
    real_send, real_sendall = socket.socket.send, socket.socket.sendall
    real_recv, real_recv_into = socket.socket.recv, socket.socket.recv_into

    # Bytes are counted before they are sent: a reader in another thread may take them before send returns.
    def send(self, data, *args):
        if not _Loopback.counts(self):
            return real_send(self, data, *args)
        size = memoryview(data).nbytes
        _Loopback.add(size)
        n = 0
        try:
            n = real_send(self, data, *args)
        finally:
            _Loopback.add(n - size)
        return n

    def sendall(self, data, *args):
        if not _Loopback.counts(self):
            return real_sendall(self, data, *args)
        size = memoryview(data).nbytes
        _Loopback.add(size)
        try:
            real_sendall(self, data, *args)
        except BaseException:
            _Loopback.add(-size)
            raise

    def recv(self, *args):
        data = real_recv(self, *args)
        if data and _Loopback.counts(self):
            _Loopback.add(-len(data))
        return data

    def recv_into(self, *args):
        n = real_recv_into(self, *args)
        if n and _Loopback.counts(self):
            _Loopback.add(-n)
        return n

    patch.set(socket.socket, "send", send)
    patch.set(socket.socket, "sendall", sendall)
    patch.set(socket.socket, "recv", recv)
    patch.set(socket.socket, "recv_into", recv_into)
    _Loopback.in_flight = 0
    _Loopback._local.clear()  # an earlier emulation's ports may be another process's now


class _VirtualSelector(selectors.BaseSelector):
    """A selector that waits in virtual time: returns ready sockets at once, else blocks on the clock."""

    def __init__(self, emu: Emulator, loop: VirtualLoop):
        self._sel = selectors.DefaultSelector()
        self._emu = emu
        self._loop = loop
        self.wake: threading.Lock | None = None

    def register(self, fileobj, events, data=None):
        return self._sel.register(fileobj, events, data)

    def unregister(self, fileobj):
        return self._sel.unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        return self._sel.modify(fileobj, events, data)

    def get_map(self):
        return self._sel.get_map()

    def get_key(self, fileobj):
        return self._sel.get_key(fileobj)

    def close(self):
        self._sel.close()

    def select(self, timeout=None):
        ready = self._sel.select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        ready = _await_loopback_bytes(self._sel)
        if ready:
            return ready
        clock = self._emu.clock
        deadline = None if timeout is None else clock.thread_now() + timeout
        lock = threading.Lock()
        lock.acquire()
        self.wake = lock
        try:
            clock.block(deadline, lock, wait=lambda seconds: bool(self._sel.select(seconds)))
        finally:
            self.wake = None
        return self._sel.select(0)


def _ready(object_list, seconds: float | None) -> list:
    """The objects of `object_list` (connections, sockets, process sentinels) readable within `seconds` of
    real time, as multiprocessing.connection.wait finds them."""
    with multiprocessing.connection._WaitSelector() as selector:
        for obj in object_list:
            selector.register(obj, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(seconds)]


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose `time()` is the virtual clock; idle, it jumps to its next timer."""

    def __init__(self, emu: Emulator):
        self._emu = emu
        self._vselector = _VirtualSelector(emu, self)
        super().__init__(self._vselector)

    def time(self):
        return time.monotonic()

    def _write_to_self(self):
        super()._write_to_self()
        lock = self._vselector.wake
        if lock is not None:  # another thread scheduled a callback: wake the loop now
            self._emu.clock.unblock(lock)
            try:
                lock.release()
            except RuntimeError:
                pass


class _VirtualPolicy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, emu: Emulator):
        super().__init__()
        self._emu = emu

    def new_event_loop(self):
        return VirtualLoop(self._emu)
