"""`Engine` and `Transfer`: the transfer engine's batches as `concurrent.futures.Future`s.

The native engine (`_native._Engine`) posts a batch and returns a native ticket; `Engine.read`
and `Engine.write` wrap it in a `Transfer`, a Future that is running from the start (a posted
batch cannot be cancelled). One daemon thread per engine (`_Waiter`, started by the first post)
waits on every pending ticket at once in Rust, with the GIL released (`_native._Watch`), and
settles each future when its batch ends, so that callbacks, `concurrent.futures.wait` and
`as_completed`, and `asyncio.wrap_future` see it. `result()` and `exception()` do not need that
thread: they wait on their own ticket.

Owns: the futures' states and the waiter thread's life (it ends once the engine is closed or
collected and its pending batches have ended, or at once when the interpreter exits). Must not:
hold the engine (the waiter holds tickets only, so an engine can be collected), or let a buffer
go while a batch may use it (a ticket holds its batch's memory in Rust until the batch ends).
"""

import atexit
import threading
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any, Dict, Iterable, Optional, Tuple, Union

from . import _native

__all__ = ["Engine", "Transfer"]

# The longest the waiter thread sleeps with nothing pending before it looks at its state again.
_IDLE_S = 1.0
# The longest interpreter exit waits for a waiter thread to leave its native wait.
_EXIT_JOIN_S = 2.0

_Bytes = Union[bytes, bytearray, memoryview]
_Request = Tuple[int, int, int, int, int]
_Report = Dict[str, Any]


class Transfer(Future[_Report]):
    """A batch posted by `Engine.read` or `Engine.write`: a `concurrent.futures.Future` whose
    result is the engine's report (a dict) or whose exception is the batch's error. Running from
    the start: `cancel()` is False. `result(timeout)` raises `TimeoutError` after `timeout`
    seconds (the batch goes on)."""

    def __init__(self, ticket: "_native._Ticket") -> None:
        if not isinstance(ticket, _native._Ticket):
            raise TypeError(f"Transfer wraps a posted batch, not {type(ticket).__name__}: use Engine.read/write")
        super().__init__()
        self._ticket = ticket
        # The waiter watching the batch, until it or another thread settled the future.
        self._waiter: "Optional[_Waiter]" = None
        self.set_running_or_notify_cancel()

    def _settle(self) -> None:
        """Copies the ended batch's outcome into the future, once (the waiter thread and a
        caller of `result` may both try)."""
        try:
            report = self._ticket.outcome()
        except Exception as e:  # the batch's error, raised by `result`
            settle, value = self.set_exception, e
        else:
            settle, value = self.set_result, report
        try:
            settle(value)
        except InvalidStateError:
            pass

    def _settle_here(self) -> None:
        """Settles the future in this thread, and tells the waiter to stop watching it (so that
        its thread does not take the GIL for a batch already settled)."""
        self._settle()
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.discard(self)

    def _drive(self, timeout: Optional[float]) -> None:
        """Waits on the ticket itself for up to `timeout` seconds, then settles the future."""
        if not Future.done(self):
            self._ticket.wait(timeout)
            self._settle_here()

    def done(self) -> bool:
        """True once the batch has ended, done or failed (makes progress without waiting)."""
        if Future.done(self):
            return True
        if self._ticket.done():
            self._settle_here()
            return True
        return False

    def result(self, timeout: Optional[float] = None) -> _Report:
        """The report: `bytes`, `requests`, `seconds`, `rails`, `retries`, `routes`, `notified`;
        or the batch's error raised."""
        self._drive(timeout)
        return super().result(0)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The batch's error, or None when it succeeded."""
        self._drive(timeout)
        return super().exception(0)

    def __repr__(self) -> str:
        return "<peermem.Transfer %s>" % ("done" if self.done() else "pending")


class _Waiter:
    """One engine's waiter thread: settles the futures of its pending batches as they end."""

    def __init__(self) -> None:
        self._watch = _native._Watch()
        self._futures: "dict[_native._Ticket, Transfer]" = {}
        self._lock = threading.Lock()
        self._thread = None
        self._closed = False
        self._stopped = False

    def add(self, future: Transfer) -> None:
        """Watches `future`'s batch; starts the thread when none runs."""
        with self._lock:
            self._futures[future._ticket] = future
            future._waiter = self
            self._watch.add(future._ticket)
            if self._thread is None:
                _LIVE.add(self)
                self._thread = threading.Thread(target=self._run, name="peermem-engine-waiter", daemon=True)
                self._thread.start()

    def discard(self, future: Transfer) -> None:
        """Stops watching `future`'s batch (settled by another thread)."""
        with self._lock:
            if self._futures.pop(future._ticket, None) is not None:
                self._watch.discard(future._ticket)

    def close(self) -> None:
        """Ends the thread once the pending batches have ended (each is bounded by the engine's
        `timeout`)."""
        self._closed = True
        self._watch.wake()

    def stop(self) -> None:
        """Ends the thread now, pending batches or not (interpreter exit)."""
        self._stopped = True
        self._watch.wake()
        thread = self._thread
        if thread is not None:
            thread.join(_EXIT_JOIN_S)

    def _run(self) -> None:
        while True:
            ended = self._watch.wait(_IDLE_S)
            with self._lock:
                # A batch settled by another thread meanwhile is no longer there.
                settle = [f for f in (self._futures.pop(t, None) for t in ended) if f is not None]
                leave = self._stopped or (self._closed and not self._futures)
                if leave:
                    self._thread = None
            for f in settle:
                f._waiter = None
                f._settle()
            if leave:
                return


# Waiters whose thread may be running, stopped before the interpreter finalizes (a thread still
# in a native wait then could not take the GIL back).
_LIVE: "weakref.WeakSet[_Waiter]" = weakref.WeakSet()


@atexit.register
def _stop_waiters() -> None:
    for w in list(_LIVE):
        w.stop()


_NEW_WAITER = threading.Lock()


class Engine(_native._Engine):
    """The transfer engine across hosts over the RDMA NICs `nics` (default: every active one),
    each listening on `port` (0: any). `host`: the name peers see (default: the hostname);
    `timeout`: seconds a batch may take before it fails; `depth`: work requests in flight per
    rail (1 to 64). `read` and `write` return `Transfer` futures. A context manager (`close` on
    exit)."""

    def read(self, peer: int, batch: Iterable[_Request], notify: Optional[_Bytes] = None) -> Transfer:
        """The peer's bytes into local regions: `batch` is `(local_id, local_offset, remote_id,
        remote_offset, length)` tuples posted as one unit; `notify` (at most 4096 bytes) reaches
        the peer once every byte landed. A `Transfer` at once. `ValueError` for a bad tuple, an
        unknown region or peer, or a range past a region's end; `TypeError` for a wrong type."""
        return self._watched(super().read(peer, batch, notify))

    def write(self, peer: int, batch: Iterable[_Request], notify: Optional[_Bytes] = None) -> Transfer:
        """Local bytes into the peer's regions; as `read`."""
        return self._watched(super().write(peer, batch, notify))

    def close(self) -> None:
        """Stops the listener, lets go of the registrations and connections; the futures of
        batches still pending are settled when they end."""
        super().close()
        waiter = self.__dict__.get("_waiter")
        if waiter is not None:
            waiter.close()

    def _watched(self, ticket: "_native._Ticket") -> Transfer:
        future = Transfer(ticket)
        waiter = self.__dict__.get("_waiter") or self._new_waiter()
        waiter.add(future)
        return future

    def _new_waiter(self) -> _Waiter:
        with _NEW_WAITER:
            waiter = self.__dict__.get("_waiter")
            if waiter is None:
                waiter = self._waiter = _Waiter()
                # Collected without `close`: the thread still ends (it holds no engine).
                weakref.finalize(self, waiter.close)
            return waiter


for _cls in (Engine, Transfer):
    _cls.__module__ = "peermem"
