# vllm-mux on top of the matching upstream vLLM image (CUDA).
# Not built in CI here: the CI machine has no Docker engine and no GPU.
FROM vllm/vllm-openai:v0.32.0

COPY . /opt/vllm-mux
RUN pip install --no-cache-dir "/opt/vllm-mux[cuda]"

# The image serves like upstream's; with VLLM_MUX_SOCKET set, the plugin joins
# that daemon. `vllm-mux serve` runs the daemon, the instances and the router.
ENTRYPOINT ["vllm-mux"]
CMD ["serve", "--host", "0.0.0.0"]
