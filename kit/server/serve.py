"""Running the app: `kit serve` (uvicorn in the foreground), and a server in the background.

* `build_llm(args)` makes the `LLM` the way `kit bench` does (same loader, same BuildConfig
  fields), so online and offline numbers come from the same engine.
* `kit serve` runs the `LLM` in an engine process of its own (`ProcessEngineClient`,
  kit/server/engine_process.py) and uvicorn in this one; `--no-engine-process` keeps both here.
* `run_server(llm, config, host, port)` serves until SIGINT/SIGTERM; on either, uvicorn
  stops accepting connections, lets the requests in flight finish (up to
  `drain_timeout` seconds), then the app's shutdown stops the executor.
* `ServerThread` serves an `LLM` from a thread of this process (tests, notebooks);
  `ServerProcess` starts `kit serve` as a child process and stops it with SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import torch
import uvicorn

from kit.builder import BuildConfig
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.server.app import ServerConfig, create_app
from kit.server.engine_client import EngineClient
from kit.server.engine_process import ProcessEngineClient

__all__ = ["add_arguments", "build_llm", "main", "run_server", "free_port", "ServerThread", "ServerProcess"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model name/path, an engine directory, or synthetic:<preset>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: MODEL)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait beyond a full batch (then 503)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size: ranks (GPUs, or CPU processes)")
    p.add_argument("--quantization", default=None, help="fp8 | int8_wo | int4_wo | int4_awq | int4_gptq | int8_sq")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--max-num-tokens", type=int, default=2048)
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-mixed-graphs", action="store_true",
                   help="graph pure decode steps only; steps with prompt tokens run eagerly")
    p.add_argument("--seed", type=int, default=0, help="weights seed of a synthetic:<preset> model")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own (default), so HTTP work never slows its loop")


def build_llm(args: argparse.Namespace) -> LLM:
    """The LLM `kit serve` serves, loaded and configured as `kit bench` does."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bc = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=min(args.max_input_len, args.max_seq_len),
                     max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                     use_cuda_graphs=not args.no_cuda_graphs, dtype=args.dtype,
                     cuda_graph_mixed_steps=not args.no_mixed_graphs)
    model: Any = args.model  # a name, path or engine directory: LLM loads it (through the build cache)
    if args.model.startswith("synthetic:"):  # random weights made on the device, as `kit bench` makes them
        model = ModelLoader.synthetic(args.model.split(":", 1)[1], seed=args.seed, device=device,
                                      dtype=None if args.dtype == "auto" else args.dtype)
    return LLM(model, device=device, build_config=bc, quantization=args.quantization,
               enable_prefix_caching=args.enable_prefix_caching or None, tensor_parallel_size=args.tp)


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT that has drained the requests exits with status 0.

    NOTE: uvicorn re-raises the captured signal after its shutdown, so the process would
    die "killed by SIGTERM" (-15) even after a clean drain.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _uvicorn_config(app: Any, host: str, port: int, drain_timeout: float | None, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                          lifespan="on", access_log=False)


def run_server(llm: LLM | EngineClient, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               drain_timeout: float | None = 60.0, log_level: str = "warning") -> None:
    """Serve `llm` (an `LLM` or an `EngineClient`) in the foreground until SIGINT/SIGTERM (drains,
    then shuts the engine down)."""
    server = _Server(_uvicorn_config(create_app(llm, config), host, port, drain_timeout, log_level))
    print(f"kit serve: {config.model_name} on http://{host}:{port}/v1", flush=True)
    server.run()


def main(args: argparse.Namespace) -> int:
    config = ServerConfig(model_name=args.served_model_name or args.model, api_key=args.api_key,
                          max_queue=args.max_queue)
    engine = ProcessEngineClient(build_llm, (args,)) if args.engine_process else build_llm(args)
    run_server(engine, config, args.host, args.port, args.drain_timeout, args.log_level)
    return 0


class ServerThread:
    """Serve `llm` from a background thread of this process: `with ServerThread(llm, cfg) as s: s.url`."""

    def __init__(self, llm: LLM, config: ServerConfig, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.app = create_app(llm, config)
        self.server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port, 30.0, "warning"))
        self._thread = threading.Thread(target=self.server.run, name="kit-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __repr__(self) -> str:
        return f"ServerThread({self.url}, {'running' if self._thread.is_alive() else 'stopped'})"

    def _repr_html_(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<b>ServerThread</b> <code>{html.escape(self.url)}/v1</code> ({state}, in this process)"

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ServerProcess:
    """`kit serve MODEL ...` as a child process on a free port; `stop()` sends SIGTERM and waits."""

    def __init__(self, model: str, *args: str, host: str = "127.0.0.1", port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        cmd = [sys.executable, "-m", "kit.cli", "serve", model, "--host", host, "--port", str(self.port), *args]
        self._log = tempfile.TemporaryFile(mode="w+")  # NOTE: a file, not a pipe, so a chatty child never blocks
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kit serve exited with status {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"kit serve did not answer /health on {self.url} within {timeout} s")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain, then exit); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        """What the process printed (after it has stopped)."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def __repr__(self) -> str:
        rc = self.proc.poll()
        return f"ServerProcess({self.url}, pid {self.proc.pid}, {'running' if rc is None else f'exited {rc}'})"

    def _repr_html_(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with status {rc}"
        return (f"<b>ServerProcess</b> <code>{html.escape(self.url)}/v1</code> &middot; pid {self.proc.pid} "
                f"&middot; {state}<br><code>{html.escape(' '.join(self.proc.args[2:]))}</code>")

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
