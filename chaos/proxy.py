"""A TCP proxy between workers and Postgres that injects network faults on demand.

`TcpProxy` listens on 127.0.0.1 and forwards every accepted connection to one target
(host, port). It runs its own asyncio event loop in a daemon thread, so synchronous code
(tests, the ``python -m chaos`` demo) drives it with plain method calls; each fault method
returns once the fault is in force.

Faults:

- `TcpProxy.drop_all`: abort every open connection on both sides at once (a reset, as
  when a network path or a NAT table dies); new connections are still accepted.
- `TcpProxy.stall`: accept connections but forward no bytes in either direction, on
  existing and new connections alike, until unstalled (a black hole: nothing fails, nothing
  moves). Bytes read before the stall began are held and delivered after it ends.
- `TcpProxy.refuse`: close every new connection at once; open ones are untouched.
- `TcpProxy.set_latency`: deliver every forwarded chunk this many milliseconds after it
  was read, in order, in each direction (a round trip gains at least twice the latency).

`proxied_url` points a libpq URL at the proxy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

logger = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
# Chunks read but not yet delivered, per direction, before reading pauses (backpressure).
QUEUE_CHUNKS = 64
START_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# libpq conninfo keys that choose the server; `proxied_url` replaces them all.
_HOST_KEYS = ("host", "hostaddr", "port")

T = TypeVar("T")


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client side and, once connected, the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dropped: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close `writer`'s socket at once with a TCP reset, discarding unsent data."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter | None) -> None:
    """Close `writer` gracefully (buffered data is flushed first), ignoring errors."""
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class TcpProxy:
    """A fault-injecting TCP proxy from 127.0.0.1:`listen_port` to `target_host`:`target_port`.

    `listen_port` 0 picks a free port; `start` returns the one chosen. The proxy runs in its
    own thread and event loop; every public method is thread-safe and returns once done.
    Also a context manager (`start` on enter, `stop` on exit).

    Counters (read at any time): `accepted` (every connection accepted, refused ones too),
    `dropped` (connections aborted by `drop_all`), `refused` (closed by `refuse`) and
    `active` (open now).
    """

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_port = listen_port
        self.accepted = 0
        self.dropped = 0
        self.refused = 0
        self._latency_s = 0.0
        self._stalled = False
        self._refusing = False
        self._pairs: set[_Pair] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # set while not stalled
        self._stopped: asyncio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"TcpProxy({LISTEN_HOST}:{self.listen_port} -> {self.target_host}:{self.target_port})"
        )

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (meaningful after `start`)."""
        return self.listen_port

    @property
    def active(self) -> int:
        """Connections open now."""
        return len(self._pairs)

    def start(self) -> int:
        """Start listening on 127.0.0.1 in a new thread; return the port.

        Raises `RuntimeError` when already started, `OSError` when the port cannot be bound,
        and `TimeoutError` when the loop does not come up within 10 s.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already started")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="tcp-proxy", daemon=True
        )
        self._thread.start()
        try:
            self.listen_port = ready.result(timeout=START_TIMEOUT_S)
        except BaseException:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            self._thread = None
            raise
        logger.info("proxy %r started", self)
        return self.listen_port

    def stop(self) -> None:
        """Stop listening, abort every open connection and end the thread (within 10 s).
        Does nothing when not running."""
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None or loop is None or stopped is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already ended
            loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=STOP_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("proxy %r: thread did not end within %.0fs", self, STOP_TIMEOUT_S)
        self._thread = None
        logger.info(
            "proxy %r stopped: accepted %d, dropped %d, refused %d",
            self,
            self.accepted,
            self.dropped,
            self.refused,
        )

    # --- faults ------------------------------------------------------------------------------

    def drop_all(self) -> int:
        """Abort every open connection on both sides with a TCP reset, like a network cut;
        return how many were open. New connections are still accepted."""
        n = self._call(self._drop_all)
        logger.info("proxy %r: dropped %d connection(s)", self, n)
        return n

    def stall(self, on: bool = True) -> None:
        """While `on`, accept connections but forward no bytes either way, on open and new
        connections; `stall(False)` resumes forwarding, delivering what was held."""

        def apply() -> None:
            assert self._flowing is not None
            self._stalled = on
            if on:
                self._flowing.clear()
            else:
                self._flowing.set()

        self._call(apply)
        logger.info("proxy %r: %s", self, "stalled" if on else "forwarding again")

    def refuse(self, on: bool = True) -> None:
        """While `on`, close every new connection as soon as it is accepted."""

        def apply() -> None:
            self._refusing = on

        self._call(apply)
        logger.info("proxy %r: %s", self, "refusing" if on else "accepting again")

    def set_latency(self, ms: float) -> None:
        """Deliver each forwarded chunk `ms` milliseconds (>= 0) after it was read, in each
        direction; 0 forwards at once. Applies to chunks read from now on."""
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")

        def apply() -> None:
            self._latency_s = ms / 1000

        self._call(apply)
        logger.info("proxy %r: latency %.0f ms per chunk", self, ms)

    @property
    def stalled(self) -> bool:
        """Whether the proxy is stalled now."""
        return self._stalled

    @property
    def refusing(self) -> bool:
        """Whether the proxy refuses new connections now."""
        return self._refusing

    @property
    def latency_ms(self) -> float:
        """The latency added to each forwarded chunk, in milliseconds."""
        return self._latency_s * 1000

    # --- the loop thread ---------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the proxy's loop and return its result (raises `RuntimeError` when the
        proxy is not running)."""
        loop = self._loop
        if self._thread is None or loop is None:
            raise RuntimeError(f"{self!r} is not running")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=CALL_TIMEOUT_S)

    def _thread_main(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                logger.exception("proxy %r failed", self)
        finally:
            with contextlib.suppress(Exception):
                # Handlers of connections accepted while stopping are still pending: end them.
                leftover = asyncio.all_tasks(loop)
                for task in leftover:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                # transport.abort() closes its socket in a call_soon callback: run the ready
                # callbacks before closing the loop, or the socket is left open (ResourceWarning).
                for _ in range(3):
                    loop.run_until_complete(asyncio.sleep(0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        self._flowing = asyncio.Event()
        if not self._stalled:
            self._flowing.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, LISTEN_HOST, self.listen_port, reuse_address=True
        )
        port: int = self._server.sockets[0].getsockname()[1]
        ready.set_result(port)
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            pairs = list(self._pairs)
            tasks = [t for p in pairs for t in p.tasks]
            for p in pairs:
                _abort(p.client)
                _abort(p.upstream)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

    def _drop_all(self) -> int:
        pairs = list(self._pairs)
        for p in pairs:
            p.dropped = True
            _abort(p.client)
            _abort(p.upstream)
            for t in p.tasks:  # they may be parked on a stall, which no reset wakes
                t.cancel()
        self.dropped += len(pairs)
        return len(pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One accepted connection: connect upstream, forward both ways until either side
        ends, then close both."""
        self.accepted += 1
        if self._refusing:
            self.refused += 1
            _abort(writer)
            return
        pair = _Pair(client=writer)
        task = asyncio.current_task()
        assert task is not None
        pair.tasks.add(task)
        self._pairs.add(pair)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError as exc:
                logger.debug("proxy %r: cannot reach the target: %s", self, exc)
                return
            pair.upstream = up_writer
            if pair.dropped:  # drop_all came while connecting
                _abort(up_writer)
                return
            directions = {
                asyncio.create_task(self._direction(reader, up_writer)),
                asyncio.create_task(self._direction(up_reader, writer)),
            }
            pair.tasks |= directions
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # drop_all or stop: the sockets are aborted there
        except Exception:
            logger.exception("proxy %r: connection failed", self)
        finally:
            self._pairs.discard(pair)
            others = [t for t in pair.tasks if t is not task]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if pair.dropped:
                _abort(pair.client)
                _abort(pair.upstream)
            else:
                await _close(pair.upstream)
                await _close(pair.client)

    async def _direction(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Forward `src` to `dst` until `src` ends (everything read is delivered first) or
        either side fails; honours the stall and the latency."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        flowing = self._flowing
        assert flowing is not None

        async def read() -> None:
            while True:
                await flowing.wait()
                data = await src.read(CHUNK_BYTES)
                if not data:
                    await queue.put(None)
                    return
                await queue.put((loop.time() + self._latency_s, data))

        async def deliver() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    return
                due, data = item
                delay_s = due - loop.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                await flowing.wait()
                dst.write(data)
                await dst.drain()

        reading = asyncio.create_task(read())
        delivering = asyncio.create_task(deliver())
        both = {reading, delivering}
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if reading.done() and reading.exception() is None:
                await asyncio.wait({delivering})  # EOF: deliver what was read, then end
        finally:
            for t in both:
                t.cancel()
            await asyncio.gather(*both, return_exceptions=True)


def proxied_url(db_url: str, port: int) -> str:
    """`db_url` (a libpq URL or key=value conninfo string) with its server replaced by
    127.0.0.1:`port`; user, password, database and other parameters are kept, and any
    ``host``, ``hostaddr`` or ``port`` parameter is removed."""
    if "://" not in db_url:
        params = {k: v for k, v in conninfo_to_dict(db_url).items() if k not in _HOST_KEYS}
        return make_conninfo("", **params, host=LISTEN_HOST, port=str(port))
    parts = urlsplit(db_url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@" if userinfo else ""
    netloc += f"{LISTEN_HOST}:{port}"
    query = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _HOST_KEYS
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
