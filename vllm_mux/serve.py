"""``vllm-mux serve``: the daemon, one vLLM server per model, one router port.

Everything runs as children of this process, each in its own session, and is
stopped on SIGINT/SIGTERM (or when start-up fails), so nothing is left behind.
"""

import signal
import sys
import tempfile
import time
from pathlib import Path

from vllm_mux.config import Config, Model
from vllm_mux.launch import CPU_ARGS, VllmServer, start_daemon


def default_config() -> Config:
    """The bundled model under two names on a pool that holds one: a newcomer
    sees a switch on their first two requests."""
    return Config(
        models=[Model("smol-a", "smollm2"), Model("smol-b", "smollm2")],
        device_memory="1GiB",
    )


def _source(model: Model) -> str:
    from vllm_mux.models import BUNDLED, model_path

    return str(model_path(model.source)) if model.source in BUNDLED else model.source


def serve(config: Config, socket_path: str, log_dir: str | None = None) -> int:
    import uvicorn

    from vllm_mux.router.app import make_app

    logs = Path(log_dir or tempfile.mkdtemp(prefix="vllm-mux-serve-"))
    logs.mkdir(parents=True, exist_ok=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    daemon, servers = None, []
    try:
        print(f"vllm-mux: logs in {logs}", flush=True)
        args = ["--chunk-size", config.chunk_size] if config.chunk_size else []
        daemon = start_daemon(
            socket_path, config.device_memory, logs / "daemon.log", config.device, args
        )
        print(f"vllm-mux: daemon on {config.device} with {config.device_memory}", flush=True)
        for i, model in enumerate(config.models, 1):
            print(f"vllm-mux: starting {model.name} ({i}/{len(config.models)})...", flush=True)
            start = time.monotonic()
            env = {"VLLM_MUX_PINNED": "1" if model.pinned else ""}
            if model.idle_ttl is not None:
                env["VLLM_MUX_IDLE_TTL"] = str(model.idle_ttl)
            extra = model.args or (CPU_ARGS if config.device == "cpu" else [])
            server = VllmServer(
                _source(model),
                logs / f"{model.name}.log",
                name=model.name,
                socket_path=socket_path,
                args=[*extra, "--enable-sleep-mode"],
                env=env,
            )
            servers.append(server)
            server.wait_ready(timeout=900)
            print(f"vllm-mux: {model.name} ready in {time.monotonic() - start:.0f} s", flush=True)
        app = make_app(
            {s.name: s.url for s in servers}, daemon_socket=socket_path, api_key=config.api_key
        )
        print(f"vllm-mux: serving {len(servers)} models on http://{config.host}:{config.port}")
        sys.stdout.flush()
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        print(f"vllm-mux: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish stopping the children
        print("vllm-mux: stopping", flush=True)
        for server in reversed(servers):
            server.stop()
        if daemon is not None:
            daemon.stop()
