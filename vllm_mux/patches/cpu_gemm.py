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

TARGETS = {
    "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm": "a9a03f6cc4f2e74e",
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
