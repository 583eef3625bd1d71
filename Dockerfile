# vllm-mux on top of the matching upstream vLLM image (CUDA).
# Not built in CI here: the CI machine has no Docker engine and no GPU.
FROM vllm/vllm-openai:v0.32.0

COPY . /opt/vllm-mux
RUN pip install --no-cache-dir "/opt/vllm-mux[cuda]"

# The image serves like upstream's; with VLLM_MUX_SOCKET set, the plugin joins
# that daemon. `vllm-mux serve` runs the daemon, the instances and the router.
#
# The default command runs the router on every interface of the container (a
# published port is reachable from the network), so it requires an API key
# and refuses to start without one:
#   docker run --gpus all -p 8000:8000 -e VLLM_MUX_API_KEY=sk-... vllm-mux
# Clients then send `Authorization: Bearer sk-...`. The vLLM servers behind
# the router listen on the container's 127.0.0.1 only. Any other command runs
# as given: `docker run ... vllm-mux vllm-mux daemon --device cuda:0 ...`.
ENTRYPOINT []
CMD ["/bin/sh", "-c", "exec vllm-mux serve --host 0.0.0.0 --api-key \"${VLLM_MUX_API_KEY:?the router listens on 0.0.0.0: set VLLM_MUX_API_KEY (docker run -e VLLM_MUX_API_KEY=...)}\""]
