"""``vllm-mux bench``: one module per measurement, each with its peer in the same run.

- ``switch``: sleep, wake and time-to-first-token of a real vLLM instance.
- ``gpu``: the GPU proof kit (``scripts/gpu_check.sh``): the cuda backend, the
  daemon, weights loaded straight into leased memory, 50 sleep/wake cycles
  with a captured graph, and a large wake against a plain copy. No vLLM needed.
- ``soak``: three models through ``vllm-mux serve`` under random faults (daemon
  and instance kills, sleeps, wakes); the books, leaks and every answer checked.
"""
