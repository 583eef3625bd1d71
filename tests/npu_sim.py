"""An instance on the npu backend over the simulated ACL runtime, for tests.

``Backend`` is ``vllm_mux.memory.npu.Backend`` with host tensors: on the
simulated runtime (tests/acl_sim) "device" memory is host memory, so a
tensor over a mapped range is a CPU tensor (torch_npu makes NPU ones on real
hardware). Every chunk operation (create, export, whitelist, import, map,
unmap, free, copy) is the npu backend's own code calling the simulated
libascendcl.

Run as ``python tests/npu_sim.py SOCKET MODEL``, it is a real ``Instance``
on that backend, driven by one command per line on stdin, answering one line
each on stdout ("ok ..." or "error ..."):

    load NBYTES SEED   adopt NBYTES of random float32 weights
    kv NBYTES          a KV-cache tensor from the KV arena
    sleep | wake       Instance.sleep() / wake()
    check              the weights and KV pointers unchanged, the weights' bytes too
    import HANDLE      import a shareable handle by hand (and free it at once)
    tgid               this process's bare tgid
    handles            the shareable handles of the weights chunks it maps
    reconnect          break the connection to the daemon; answer once back
"""

import sys
import time

import torch

from vllm_mux.memory import cpu, npu


class Backend(npu.Backend):
    device_type = "cpu"
    tensor = cpu.Backend.tensor
    allocating = cpu.Backend.allocating
    host_buffer = cpu.Backend.host_buffer


def main(socket_path: str, model: str) -> None:
    import vllm_mux.memory

    vllm_mux.memory.BACKENDS["npu"] = "npu_sim"
    from vllm_mux.instance import Instance

    inst = Instance(socket_path, model, key=model)
    weights: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []
    kv: list[torch.Tensor] = []
    pointers: list[int] = []
    print("ok", flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        try:
            if op == "load":
                nbytes, seed = int(args[0]), int(args[1])
                g = torch.Generator().manual_seed(seed)
                weights = [torch.randn(nbytes // 4, generator=g)]
                expected = [w.clone() for w in weights]
                inst.adopt_weights(weights)
                pointers = [w.data_ptr() for w in weights]
                reply = f"ok {inst.weights.mapped}"
            elif op == "kv":
                kv.append(inst.alloc(inst.kv_cache, int(args[0])))
                kv[-1].fill_(7)
                pointers.append(kv[-1].data_ptr())
                reply = "ok"
            elif op == "sleep":
                inst.sleep()
                reply = "ok"
            elif op == "wake":
                inst.wake()
                reply = "ok"
            elif op == "check":
                same = [t.data_ptr() for t in weights + kv] == pointers
                equal = all(torch.equal(w, e) for w, e in zip(weights, expected))
                reply = "ok" if same and equal else f"error pointers {same}, bytes {equal}"
            elif op == "import":
                chunk = inst.backend.import_(int(args[0]), inst.chunk_size)
                inst.backend.release(chunk)
                reply = "ok"
            elif op == "handles":
                reply = " ".join(["ok", *(str(c.shared) for c in inst.weights.chunks)])
            elif op == "reconnect":
                inst._hang_up()  # as a call that found the connection broken
                deadline = time.monotonic() + 30
                while not inst._up and not inst.lost and time.monotonic() < deadline:
                    time.sleep(0.05)
                reply = f"error {inst.lost}" if inst.lost or not inst._up else "ok"
            elif op == "tgid":
                reply = f"ok {inst.backend.tgid}"
            else:
                reply = f"error unknown command {op!r}"
        except Exception as e:
            reply = f"error {e}".replace("\n", " ")
        print(reply, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
