"""One virtual time for all the processes of an emulated engine (SGLang: front end, scheduler, detokenizer).

Each process keeps its own `Clock`; they meet through a small file mapped into every process (its path in
`REVATI_TREE`), guarded by `flock`:

- T, the shared time: the latest instant any process made visible to the others, by sending a message or
  by going idle. Processes that launch no device work (a front end) read their time from it.
- A slot per process: busy or idle, and when idle, its earliest deadline (a timer, an arrival).
- A count per message channel (a ZeroMQ PUSH / PULL endpoint) of messages sent and not yet received, with
  the process that reads the channel.

Time jumps the way it does inside one process (clock.py), only across processes: when every process is
idle and no message is in flight, T moves to the earliest deadline, and the process owning it wakes. A
process that launches device work waits, after each message it sends, until the others are idle again
with nothing in flight for them (`wait_quiet`): the receivers then read the sender's send time, not a later
one, and a request a front end sends in answer arrives before the sender's next step, as on a real GPU
where that step would still be running.
"""

from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

ENV = "REVATI_TREE"

_SLOTS = 32
_CHANNELS = 64
_T = struct.Struct("<d")  # at 0: the shared time
_COUNT = struct.Struct("<q")  # at 8: stalls; at 16: changes (of slots and channels, for cheap re-checks)
_HEADER_SIZE = 24
_SLOT = struct.Struct("<q q d")  # pid, state, deadline
_CHANNEL = struct.Struct("<q q q d")  # key, in flight, reader pid, real time of the last send
_SLOT_AT = _HEADER_SIZE
_CHANNEL_AT = _SLOT_AT + _SLOTS * _SLOT.size
_SIZE = _CHANNEL_AT + _CHANNELS * _CHANNEL.size

_FREE, _BUSY, _IDLE, _STARTING = 0, 1, 2, 3
_INF = float("inf")
# Real seconds a sender waits for the others to go quiet before it counts a stall and goes on (a process
# blocked where the emulator cannot see, a message nobody reads).
QUIET_GRACE = 2.0
# Seconds (real) a process that has not met the clock yet holds time back: its start-up.
STARTUP_GRACE = 60.0
# Real seconds within which a sent message lands in its reader's socket (ZeroMQ over ipc: microseconds).
LANDING = 0.2

_real_monotonic = time.monotonic
_real_sleep = time.sleep


def create(directory: Path) -> Path:
    """A new shared-time file in `directory`, time 0; processes join it with `Tree.join(path)`."""
    path = Path(directory) / "revati-tree"
    with open(path, "wb") as f:
        f.write(b"\0" * _SIZE)
    return path


class Tree:
    """This process's view of the shared time file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _SIZE)
        self.pid = os.getpid()
        self.slot = -1
        self.report = None

    @classmethod
    def join(cls, path: Path, report=None) -> Tree:
        """Take a slot and leave it at exit. The process is starting until one of its threads meets the
        clock (`busy`): time does not jump while it imports its engine (vLLM's front end polls for the
        engine core's handshake with a timeout), for at most STARTUP_GRACE seconds of real time, after which
        a helper that never meets the clock no longer holds time back. `report()` is called each time this
        process sends a message or goes idle: an engine kills its workers at shutdown (SIGKILL, no atexit),
        and their last act is a send."""
        tree = cls(path)
        tree.report = report
        tree.slot = tree.expect(tree.pid)
        atexit.register(tree.leave)
        return tree

    def expect(self, pid: int) -> int:
        """Process `pid` is starting (a child just started, or this process joining): it holds time back
        from now until it meets the clock, as if it had joined. Returns its slot."""
        with self._locked():
            free = None
            for i in range(_SLOTS):
                p, state, _ = self._slot(i)
                if p == pid:
                    return i  # expected by its parent, or already joined
                if free is None and (p == 0 or not _alive(p)):
                    free = i
            if free is None:
                raise RuntimeError(f"{self.path}: more than {_SLOTS} emulated processes share one time")
            self._set_slot(free, pid, _STARTING, _real_monotonic())
            return free

    def leave(self) -> None:
        if self.slot >= 0 and not self._map.closed:
            with self._locked():
                self._set_slot(self.slot, 0, _FREE, _INF)
            self.slot = -1

    # -- the shared time -----------------------------------------------------------------------

    def now(self) -> float:
        return _T.unpack_from(self._map, 0)[0]

    def publish(self, t: float) -> float:
        """Make instant `t` visible to the other processes; returns T."""
        with self._locked():
            return self._publish(t)

    def busy(self) -> None:
        """This process has a runnable thread: no jump may happen."""
        if self.slot >= 0 and self._slot(self.slot)[1] != _BUSY:
            self._set_slot(self.slot, self.pid, _BUSY, _INF)

    def idle(self, t: float, deadline: float) -> float:
        """Every thread of this process waits, the earliest until `deadline` (inf: none); its time is `t`.
        If every process now waits and no message is in flight, T jumps to the earliest deadline of all.
        Returns T."""
        if self.report is not None and self._slot(self.slot)[1] == _BUSY:
            self.report()
        with self._locked():
            self._set_slot(self.slot, self.pid, _IDLE, deadline)
            now = self._publish(t)
            if any(self._on_its_way(i) for i in range(_CHANNELS)):
                return now  # a message is on its way: its reader is about to be busy
            earliest = _INF
            for i in range(_SLOTS):
                pid, state, d = self._slot(i)
                if pid == 0 or state == _FREE or not _alive(pid):  # a killed process waits for nothing
                    continue
                if state == _STARTING:
                    if _real_monotonic() - d < STARTUP_GRACE:
                        return now
                    continue
                if state != _IDLE:
                    return now
                earliest = min(earliest, d)
            if now < earliest < _INF:
                if os.environ.get("REVATI_TREE_DEBUG") and earliest - now > 1:
                    print(
                        f"revati tree: {self.pid} jumps {now:.3f} -> {earliest:.3f}",
                        file=sys.stderr,
                        flush=True,
                    )
                now = earliest
                _T.pack_into(self._map, 0, now)
            return now

    # -- messages ------------------------------------------------------------------------------

    def sent(self, channel: str, t: float) -> None:
        """A message left on `channel` at this process's time `t`."""
        with self._locked():
            self._publish(t)
            i = self._find(channel)
            key, n, reader = self._channel(i)
            self._put_channel(i, key, n + 1, reader, _real_monotonic())
            self._changed()
        if self.report is not None:
            self.report()

    def received(self, channel: str) -> float:
        """A message arrived on `channel`: this process is busy from now on. Returns T."""
        with self._locked():
            if self.slot >= 0:
                self._set_slot(self.slot, self.pid, _BUSY, _INF)
            i = self._find(channel)
            key, n, _ = self._channel(i)
            self._put_channel(i, key, max(0, n - 1), self.pid)
            return self.now()

    def reads(self, channel: str) -> None:
        """This process reads `channel` (a PULL socket): messages waiting there wait for this process."""
        with self._locked():
            i = self._find(channel)
            key, n, _ = self._channel(i)
            self._put_channel(i, key, n, self.pid)

    def wait_quiet(self) -> None:
        """Wait (real time) until every other process waits for something after T and no message is in flight
        to one of them: what they were due to do by T is done."""
        started = _real_monotonic()
        while not self._quiet():
            if _real_monotonic() - started > QUIET_GRACE:
                if os.environ.get("REVATI_TREE_DEBUG"):
                    print(f"revati tree: {self.pid} waited for {self.state()}", file=sys.stderr, flush=True)
                with self._locked():
                    _COUNT.pack_into(self._map, 8, self._stalls() + 1)
                return
            _real_sleep(0.0002)

    def catch_up(self, t: float, clock, readers: dict) -> None:
        """This process's host waited for its device until `t` (a host sync): the others catch up to t, and
        what they sent meanwhile reaches the threads here that read it (`readers`: channel → the clock's state
        of the thread blocked reading it) and is handed on, before the host goes on. On a GPU the host would
        have been waiting for the step all that time: a request that arrived during it joins the next one.

        A thread that reads between its own steps (SGLang's scheduler) takes what came when it looks: with no
        other reader, nothing is done."""
        me = clock.state()
        others = [(channel, reader) for channel, reader in list(readers.items()) if reader is not me]
        if not others:
            return
        if self._quiet(t) and not any(self.in_flight_to(channel) for channel, _ in others):
            return  # nothing was due by t: T need not move (most host syncs)
        self.publish(t)
        self.wait_quiet()
        for channel, reader in others:
            landing = _real_monotonic() + LANDING
            while self.in_flight_to(channel) and _real_monotonic() < landing:
                _real_sleep(0.0002)
            clock.await_block(reader)  # it handed on what it read, and reads again

    def state(self) -> dict:
        """The shared state, for diagnosis: T, each process's state and deadline, messages in flight."""
        with self._locked():
            slots = [self._slot(i) for i in range(_SLOTS)]
            channels = [self._channel(i) for i in range(_CHANNELS)]
        return {
            "T": self.now(),
            "processes": {
                pid: ("busy", "idle", "starting")[state - 1]
                + (f"@{d:.6f}" if d < _INF and state == _IDLE else "")
                for pid, state, d in slots
                if pid
            },
            "in_flight": {reader: n for _, n, reader in channels if n},
        }

    def total_stalls(self) -> int:
        return self._stalls()

    # -- internals -----------------------------------------------------------------------------

    def _quiet(self, now: float | None = None) -> bool:
        """Whether every other process waits for something after `now` (default: T), with no message on its
        way to one of them."""
        with self._locked():
            if any(self._on_its_way(i, others_only=True) for i in range(_CHANNELS)):
                return False
            now = self.now() if now is None else now
            for i in range(_SLOTS):
                pid, state, deadline = self._slot(i)
                if i == self.slot or not pid or not _alive(pid):
                    continue
                # running, or due to wake; a process still starting is not waited for here
                if state == _BUSY or (state == _IDLE and deadline <= now):
                    return False
            return True

    def in_flight_to(self, channel: str) -> int:
        """Messages sent on `channel` and not received yet."""
        with self._locked():
            return self._channel(self._find(channel))[1]

    def _publish(self, t: float) -> float:
        now = self.now()
        if t > now:
            _T.pack_into(self._map, 0, t)
            return t
        return now

    def _stalls(self) -> int:
        return _COUNT.unpack_from(self._map, 8)[0]

    def changes(self) -> int:
        """A number that changes whenever a process's state or a message count does."""
        return _COUNT.unpack_from(self._map, 16)[0]

    def _changed(self) -> None:
        _COUNT.pack_into(self._map, 16, self.changes() + 1)

    def _slot(self, i: int) -> tuple[int, int, float]:
        return _SLOT.unpack_from(self._map, _SLOT_AT + i * _SLOT.size)

    def _set_slot(self, i: int, pid: int, state: int, deadline: float) -> None:
        _SLOT.pack_into(self._map, _SLOT_AT + i * _SLOT.size, pid, state, deadline)
        self._changed()

    def _channel(self, i: int) -> tuple[int, int, int]:
        return _CHANNEL.unpack_from(self._map, _CHANNEL_AT + i * _CHANNEL.size)[:3]

    def _put_channel(self, i: int, key: int, n: int, reader: int, sent_at: float | None = None) -> None:
        if sent_at is None:
            sent_at = _CHANNEL.unpack_from(self._map, _CHANNEL_AT + i * _CHANNEL.size)[3]
        _CHANNEL.pack_into(self._map, _CHANNEL_AT + i * _CHANNEL.size, key, n, reader, sent_at)

    def _on_its_way(self, i: int, others_only: bool = False) -> bool:
        """A message on channel i has been sent, not received, and may not have landed in its reader's socket
        yet (a message that has landed waits for its reader, who may not be reading: SGLang's front end reads
        nothing until its first request)."""
        key, n, reader = self._channel(i)
        if n <= 0 or not reader or (others_only and reader == self.pid) or not _alive(reader):
            return False
        sent_at = _CHANNEL.unpack_from(self._map, _CHANNEL_AT + i * _CHANNEL.size)[3]
        return _real_monotonic() - sent_at < LANDING

    def _find(self, channel: str) -> int:
        """The index of `channel`'s counter, taken on first use (open addressing on a CRC of its name)."""
        key = zlib.crc32(channel.encode()) + 1  # never 0, the mark of a free entry
        start = key % _CHANNELS
        for step in range(_CHANNELS):
            i = (start + step) % _CHANNELS
            k, n, reader = self._channel(i)
            if k == key:
                return i
            if k == 0:
                self._put_channel(i, key, 0, 0, 0.0)
                return i
        raise RuntimeError(f"{self.path}: more than {_CHANNELS} message channels")

    def _locked(self):
        return _Flock(self._fd)


class _Flock:
    """flock excludes other processes only (it is per open file); a thread lock excludes this one's."""

    _threads = threading.Lock()

    def __init__(self, fd: int):
        self._fd = fd

    def __enter__(self):
        self._threads.acquire()
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()


def _alive(pid: int) -> bool:
    """Whether `pid` runs: an engine kills its workers (SIGKILL, no atexit) and a killed child stays a zombie
    until reaped, which counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
