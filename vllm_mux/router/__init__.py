"""The router: one OpenAI-compatible port for every model on a vllm-mux device.

``make_app(upstreams, daemon_socket=...)`` gives the FastAPI app; serve it
with uvicorn. See ``app`` for what it does and ``metrics`` for what it reports.
"""

from vllm_mux.router.app import make_app
from vllm_mux.router.metrics import METRICS

__all__ = ["METRICS", "make_app"]
