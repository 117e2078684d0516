"""`kit.server`: an OpenAI-compatible HTTP server for a kit `LLM`, and a load generator for it.

    from kit.server import ServerConfig, ServerThread
    with ServerThread(llm, ServerConfig("smollm2-135m")) as server:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="-").completions.create(...)

`kit serve MODEL` runs it from the command line, `kit bench-serve --endpoint URL` measures it.
"""

from kit.server.app import ServerConfig, create_app
from kit.server.engine_client import EngineClient
from kit.server.metrics import ServerMetrics, metrics_frame, parse_metrics
from kit.server.serve import ServerProcess, ServerThread, build_llm, free_port, run_server

__all__ = ["ServerConfig", "create_app", "EngineClient", "ServerMetrics", "parse_metrics", "metrics_frame", "ServerProcess",
           "ServerThread", "build_llm", "free_port", "run_server"]
