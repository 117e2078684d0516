"""One client process of `kit bench-serve`: streams its share of the requests and times them.

`kit bench-serve --client-procs N` starts N of these (kit/server/load_gen.py), so that
reading ~18,000 server-sent events a second is spread over N event loops instead of
one. Each one speaks HTTP/1.1 over asyncio streams (keep-alive connections, chunked
bodies) and reads only what the timings need: the arrival time of every chunk that
carries tokens, and the token count from the last chunk's `usage`; a chunk is JSON-parsed
only when it carries `usage` or an error.

NOTE: this file imports only the standard library (and uvloop where installed) and runs
as a script (`python load_client.py`), so that a client process starts in tens of
milliseconds without importing the kit (and torch).

Protocol over the pipes: stdin gets one JSON line with the job, then `go START` (a
`time.time()` at which to begin); stdout answers `ready`, then `done` per finished
request, then `result JSON`.

Clocks: intervals are `time.perf_counter()` differences inside this process (TTFT, TPOT);
every time is reported as `START + (perf_counter() - perf_counter at START)`, so that the
parent can compare the processes' first submissions and last tokens on one wall clock.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

__all__ = ["run_job", "main"]

_USAGE_CHUNK = re.compile(rb'"choices":\s*\[\]')  # the include_usage chunk: no choices, usage set


class _Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class Client:
    """Streams completions from `endpoint` over a pool of keep-alive connections."""

    def __init__(self, endpoint: str, headers: dict[str, str]) -> None:
        url = urlsplit(endpoint)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"endpoint must be an http://HOST:PORT URL, got {endpoint!r}")
        self.host, self.port, self.base = url.hostname, url.port or 80, url.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = (f"Host: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                      f"Accept: text/event-stream\r\n{extra}")
        self._idle: list[_Conn] = []

    async def _conn(self) -> _Conn:
        if self._idle:
            return self._idle.pop()
        return _Conn(*await asyncio.open_connection(self.host, self.port))

    async def stream(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` and read the event stream: {"submit", "first", "last", "tokens", "chunks"}."""
        data = json.dumps(body).encode()
        t_submit = time.perf_counter()  # NOTE: before a new connection is made, as an HTTP client library times it
        conn = await self._conn()
        conn.writer.write(f"POST {self.base}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(data)}\r\n\r\n"
                          .encode() + data)
        try:
            first, last, chunks, usage, keep = await _read_stream(conn.reader)
        except BaseException:
            conn.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            conn.close()
        return {"submit": t_submit, "first": first, "last": last,
                "tokens": int(usage["completion_tokens"]) if usage else 0, "chunks": chunks}

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()


async def _read_stream(reader: asyncio.StreamReader) -> tuple[float | None, float | None, int, dict | None, bool]:
    """Read one response: the first and last token-chunk times, the token chunks, the usage, and whether to
    keep the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    keep = headers.get("connection", "").lower() != "close"
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if status != 200 or not chunked:
        n = int(headers.get("content-length", "0"))
        body = await reader.readexactly(n) if n else b""
        raise RuntimeError(f"HTTP {status}: {body.decode(errors='replace')[:300]}")
    first = last = None
    usage, chunks = None, 0
    buf, sse = b"", b""
    ended = False
    while not ended:
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection mid-stream")
        t = time.perf_counter()  # every event in this read arrived by now
        buf += data
        while True:  # chunked framing: SIZE\r\nPAYLOAD\r\n ... 0\r\n\r\n
            i = buf.find(b"\r\n")
            if i < 0:
                break
            size = int(buf[:i].split(b";", 1)[0], 16)
            end = i + 2 + size + 2
            if len(buf) < end:
                break
            sse += buf[i + 2:end - 2]
            buf = buf[end:]
            if size == 0:
                ended = True
                break
        while (j := sse.find(b"\n\n")) >= 0:  # server-sent events: "data: ...\n\n"
            event, sse = sse[:j], sse[j + 2:]
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    continue
                if payload.startswith(b'{"error"'):
                    raise RuntimeError(json.loads(payload)["error"]["message"])
                if _USAGE_CHUNK.search(payload):
                    usage = json.loads(payload).get("usage")
                else:
                    last = t
                    first = first or t
                    chunks += 1
    return first, last, chunks, usage, keep


async def run_job(job: dict[str, Any], start_at: float, on_done=None) -> dict[str, Any]:
    """Send `job["prompts"]` with at most `job["concurrency"]` in flight, the i-th not before
    `start_at + job["arrivals"][i]` (None: closed loop). Times on the `time.time()` clock."""
    delay = start_at - time.time()
    if delay > 0:  # every client process begins at the same moment
        await asyncio.sleep(delay)
    anchor, wall = time.perf_counter(), time.time()

    def clock(t: float | None) -> float | None:
        return None if t is None else wall + (t - anchor)

    client = Client(job["endpoint"], job.get("headers") or {})
    slots = asyncio.Semaphore(job["concurrency"])
    body = {"model": job["model"], "max_tokens": job["output_len"], "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    arrivals = job.get("arrivals")

    async def one(prompt: list[int]) -> dict[str, Any]:
        try:
            return await client.stream("/v1/completions", {**body, "prompt": prompt})
        finally:
            slots.release()
            if on_done is not None:
                on_done()

    tasks = []
    try:
        for i, p in enumerate(job["prompts"]):
            await slots.acquire()
            if arrivals is not None:
                delay = anchor + arrivals[i] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(p)))
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        client.close()
    end = time.perf_counter()
    return {"requests": [{"submit": clock(r["submit"]), "first": clock(r["first"]), "last": clock(r["last"]),
                          "tokens": r["tokens"], "chunks": r["chunks"]} for r in results],
            "start": wall, "end": clock(end)}


def main() -> int:
    job = json.loads(sys.stdin.readline())
    runner = asyncio.run
    try:
        import uvloop  # noqa: PLC0415 - optional: a faster event loop where installed
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if not line or line[0] != "go":
        return 1
    out = sys.stdout

    def done() -> None:
        out.write("done\n")
        out.flush()

    try:
        result = runner(run_job(job, float(line[1]), done))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        print("error " + json.dumps(f"{type(e).__name__}: {e}"), flush=True)
        return 1
    print("result " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
