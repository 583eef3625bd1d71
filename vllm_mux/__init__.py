"""vllm-mux: many vLLM instances, many models, one accelerator.

A daemon owns the device's memory and leases it to vLLM instances, which this
package's plugin makes sleep (memory back to the pool) and wake (same
addresses, weights copied back in) without restarting. See README.md.
"""

__version__ = "0.1.0"
