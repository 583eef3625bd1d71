"""Keep CPU linear weights as plain tensors, so they can live in leased memory.

Target: ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``.
Why: after loading, upstream repacks each linear weight into an opaque oneDNN
(or sgl-kernel) handle and, for ``LinearBase`` layers, drops the original
weight. The packed copy is memory the pool cannot see, map or unmap: the
instance would compute on memory that never sleeps.
How: with the daemon configured, every 2-D unquantized weight keeps its
tensor and computes with ``torch.nn.functional.linear`` over it (upstream's
own fallback), so the weight that computes is the one in leased memory.
The cost against upstream's packed path is measured in docs/benchmarks.md.
Upstream: delete once oneDNN handles can be created over caller-owned memory
(or re-created cheaply on wake) — there is no upstream issue for this yet.
"""

# Upstream symbols this patch replaces or relies on -> sha256 of their source.
# The callers import the dispatcher from its module at call time, which is
# what lets a module attribute replace it.
TARGETS = {
    "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm": "2ba18ce6108799da",
    "vllm.model_executor.layers.linear.UnquantizedLinearMethod.process_weights_after_loading": (
        "57e9db55858f6e18"
    ),
    "vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod"
    ".process_weights_after_loading": "3f18c9f56bcc9abd",
}


def apply() -> None:
    import torch
    from vllm.model_executor.layers import utils

    upstream = utils.dispatch_cpu_unquantized_gemm

    def dispatch_over_weight(layer, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # conv and MoE weights: upstream's own paths
            return upstream(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = dispatch_over_weight
