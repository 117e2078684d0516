"""The engine in a process of its own, so that HTTP work and the serving loop never share a GIL.

`kit serve` runs uvicorn (request parsing, tokenization, SSE encoding of every token)
in the main process and the `LLM` (scheduler, forward, sampling, detokenization) in a
child process, as vLLM's AsyncLLM / EngineCore split does. With both in one process,
each streamed token costs Python time that the executor's loop waits for: at 64
concurrent streams the loop ran at about a third of its offline speed
(`bench/results/serve_vs_offline_h200.json`).

    HTTP process                                   engine process
    ProcessEngineClient.submit ── ("submit", key, ids, params) ──► LLM.generate_async
                               ◄── ("reply", call, None | error) ─┘
    reader thread ◄── ("out", [(key, delta | None, error), ...]) ── forwarder thread
    local GenerationResult.publish(..., wake=)                          (one message per burst)
    one call_soon_threadsafe per event loop and message

One `multiprocessing` pipe carries both ways; the engine process sends from two threads
under one lock. The HTTP side keeps a local `GenerationResult` per request, fed by its
reader thread, so the app code is the same as with an in-process `EngineClient`. Snapshots
travel as deltas (kit/server/snapshot_delta.py: the new tokens and text, not the whole
request again), and a message of many requests' snapshots wakes the HTTP event loop once,
not once per request. If the
engine process dies, every pending request fails with a message that says so, and
`/health` turns 503.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import signal
import threading
import weakref
from collections import defaultdict, deque
from typing import Any, Callable

from kit.outputs import GenerationResult, RequestOutput
from kit.sampling_params import SamplingParams
from kit.server.engine_client import EngineClient, EngineLoad
from kit.server.snapshot_delta import SnapshotDecoder, SnapshotEncoder

__all__ = ["ProcessEngineClient", "EngineProcessError"]

_CALL_TIMEOUT_S = 120.0


class EngineProcessError(RuntimeError):
    """The engine process is gone (or never came up)."""


def _engine_main(conn: Any, factory: Callable[..., Any], factory_args: tuple) -> None:
    """The child: build the LLM, answer calls, forward every published snapshot."""
    # NOTE: Ctrl-C reaches the whole process group; the HTTP process decides when the engine stops
    # (after draining), and a vanished parent shows here as the pipe's end of file
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        client = EngineClient(factory(*factory_args))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        try:
            conn.send(("fatal", e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes as its text
            conn.send(("fatal", RuntimeError(f"{type(e).__name__}: {e}")))
        return
    send_lock = threading.Lock()
    pending: deque[tuple[str, RequestOutput | None, BaseException | None]] = deque()
    wake = threading.Event()
    results: dict[str, GenerationResult] = {}
    encoder = SnapshotEncoder()
    stop = False

    def send(msg: Any) -> None:
        with send_lock:
            conn.send(msg)

    def forward() -> None:  # NOTE: one message per burst: a step publishes every request's token at once
        while not stop or pending:
            wake.wait(0.1)
            wake.clear()
            batch, ended = [], []
            while pending:
                key, out, err = pending.popleft()
                batch.append((key, encoder.encode(key, out) if out is not None else None, err))
                if err is not None or (out is not None and out.finished):
                    ended.append(key)
            if batch:
                try:
                    send(("out", batch))
                except (OSError, ValueError):
                    return
                for key in ended:
                    results.pop(key, None)
                    encoder.forget(key)

    tok = client.tokenizer
    send(("ready", client.limits, tok))
    forwarder = threading.Thread(target=forward, name="kit-engine-forward", daemon=True)
    forwarder.start()
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "submit":
                _, call, key, ids, params, streaming = msg
                try:
                    result = client.submit(ids, params, streaming)
                except Exception as e:  # noqa: BLE001 - the caller's error (a 400)
                    send(("reply", call, e))
                    continue
                results[key] = result

                def listener(out: RequestOutput | None, err: BaseException | None, key: str = key) -> None:
                    pending.append((key, out, err))
                    wake.set()
                send(("reply", call, None))
                result.add_listener(listener)
            elif kind == "abort":
                result = results.get(msg[1])
                if result is not None:
                    client.abort(result.request_id)
            elif kind == "call":
                _, call, name = msg
                try:
                    value = getattr(client, name)()
                except Exception as e:  # noqa: BLE001
                    value = e
                send(("reply", call, value))
            elif kind == "shutdown":
                break
    finally:
        client.shutdown()
        stop = True
        wake.set()
        forwarder.join(30.0)
        try:
            send(("bye",))
        except (OSError, ValueError):
            pass
        conn.close()


def _wake(waiters: list[tuple[Any, Any]]) -> None:
    """Set asyncio events from this thread with one `call_soon_threadsafe` per event loop."""
    by_loop: dict[Any, list] = defaultdict(list)
    for loop, event in waiters:
        by_loop[loop].append(event)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def _set_all(events: list) -> None:
    for event in events:
        event.set()


class ProcessEngineClient(EngineClient):
    """An `EngineClient` whose `LLM` lives in a child process made by `factory(*factory_args)`.

    `factory` must be importable by name (the child is spawned, not forked: CUDA does not
    survive a fork). Tokenization stays on this side (the child sends its tokenizer).
    """

    def __init__(self, factory: Callable[..., Any], factory_args: tuple = (), *,
                 start_timeout: float = 600.0) -> None:
        self._reader: threading.Thread | None = None
        self._dead: str | None = None
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        # NOTE: not a daemon: the engine may start processes of its own (tensor-parallel ranks), which a
        # daemonic process may not; an exit hook stops it instead (and a vanished parent closes its pipe)
        self.process = ctx.Process(target=_engine_main, args=(child, factory, factory_args), name="kit-engine")
        self.process.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (c := ref()) is not None and c.shutdown(timeout=30.0))
        child.close()
        if not self._conn.poll(start_timeout):
            self._kill()
            raise EngineProcessError(f"the engine process did not start within {start_timeout} s")
        msg = self._recv_or_fail("starting")
        if msg[0] == "fatal":
            self.process.join(10.0)
            if isinstance(msg[1], (ValueError, TypeError)):  # a bad configuration: the caller's error, as is
                raise msg[1]
            raise EngineProcessError(f"the engine process failed to start: {type(msg[1]).__name__}: {msg[1]}")
        _, self.limits, self._tokenizer = msg
        self.llm = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._results: dict[str, GenerationResult] = {}
        self._calls: dict[int, list] = {}  # call id -> [Event, value]
        self._call_ids = itertools.count()
        self._keys = itertools.count()
        self._reader = threading.Thread(target=self._read, name="kit-engine-reader", daemon=True)
        self._reader.start()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def alive(self) -> bool:
        return self._dead is None and self.process.is_alive()

    # --------------------------------------------------------------- calls
    def _recv_or_fail(self, what: str) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self.process.join(10.0)
            raise EngineProcessError(f"the engine process exited with status {self.process.exitcode} while "
                                     f"{what}") from None

    def _send(self, msg: Any) -> None:
        if self._dead is not None:
            raise EngineProcessError(self._dead)
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as e:
            raise EngineProcessError(f"the engine process is gone ({e})") from None

    def _call(self, kind: str, *args: Any) -> Any:
        call = next(self._call_ids)
        slot = [threading.Event(), None]
        with self._lock:
            self._calls[call] = slot
        try:
            self._send((kind, call, *args))
            if not slot[0].wait(_CALL_TIMEOUT_S):
                raise EngineProcessError(f"the engine process did not answer {kind!r} within {_CALL_TIMEOUT_S} s")
        finally:
            with self._lock:
                self._calls.pop(call, None)
        if isinstance(slot[1], BaseException):
            raise slot[1]
        return slot[1]

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "out":
                waiters: list = []
                for key, delta, err in msg[1]:
                    result = self._results.get(key)
                    if result is None:
                        continue
                    out = None
                    if delta is not None:
                        try:
                            out = SnapshotDecoder.decode(delta, result.latest)
                        except ValueError as e:  # a lost delta: fail the request rather than show wrong text
                            err = EngineProcessError(f"request {key}: {e}")
                    result.publish(out, err, wake=waiters)
                    if result.done:
                        with self._lock:
                            self._results.pop(key, None)
                _wake(waiters)
            elif msg[0] == "reply":
                with self._lock:
                    slot = self._calls.get(msg[1])
                if slot is not None:
                    slot[1] = msg[2]
                    slot[0].set()
            elif msg[0] == "bye":
                break
        self.process.join(5.0)
        code = self.process.exitcode
        self._dead = (f"the engine process (pid {self.process.pid}) exited"
                      + (f" with status {code}" if code is not None else ""))
        with self._lock:
            results, self._results = list(self._results.values()), {}
            calls = list(self._calls.values())
        for result in results:
            result.publish(None, EngineProcessError(f"{self._dead} before this request finished"))
        for slot in calls:
            slot[1] = EngineProcessError(self._dead)
            slot[0].set()

    # ----------------------------------------------------------------- API
    def submit(self, prompt_token_ids: list[int], params: SamplingParams, streaming: bool) -> GenerationResult:
        key = f"req-{next(self._keys)}"
        result = GenerationResult(key, on_abandon=self.abort)
        with self._lock:
            self._results[key] = result
        try:
            self._call("submit", key, list(prompt_token_ids), params, streaming)
        except BaseException:
            with self._lock:
                self._results.pop(key, None)
            raise
        return result

    def abort(self, request_id: str) -> None:
        if self._dead is None:
            try:
                self._send(("abort", request_id))
            except EngineProcessError:
                pass

    def load(self) -> EngineLoad:
        return self._call("call", "load")

    def num_blocks_held(self) -> int:
        return self._call("call", "num_blocks_held")

    def shutdown(self, timeout: float = 120.0) -> None:
        """Stop the engine (requests still pending fail) and join the process."""
        if self._reader is None:  # it never came up
            if self.process.is_alive():
                self._kill()
            return
        if self.process.is_alive() and self._dead is None:
            try:
                self._send(("shutdown",))
            except EngineProcessError:
                pass
        self._reader.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            self._kill()

    def _kill(self) -> None:
        self.process.kill()
        self.process.join(10.0)

    def __repr__(self) -> str:
        state = "running" if self.alive else (self._dead or "stopped")
        return f"ProcessEngineClient(pid {self.process.pid}, {state}, {self.limits})"

