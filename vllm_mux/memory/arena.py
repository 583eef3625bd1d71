"""An Arena: one reserved virtual range that leased chunks are mapped into.

Tensors are carved out of the arena with a bump pointer, so an instance loses
at most the tail of its last chunk to rounding, however many tensors it has.
Sleeping unmaps every chunk and hands them back; waking maps new chunks (any
physical ones will do) at the same addresses, so every tensor, pointer and
captured graph that refers to the arena stays valid.
"""

ALIGN = 256  # bytes; what CUDA and oneDNN kernels expect of a tensor's start


class Arena:
    def __init__(self, backend, capacity: int, chunk_size: int, prefault: bool = True):
        if chunk_size % backend.granularity:
            raise ValueError(
                f"chunk size {chunk_size} is not a multiple of the device granularity "
                f"{backend.granularity}"
            )
        self.backend = backend
        self.chunk_size = chunk_size
        self.prefault = prefault  # map page tables at once: for memory used at once
        self.capacity = -(-capacity // chunk_size) * chunk_size
        self.base = backend.reserve(self.capacity)
        self.chunks: list = []  # imported chunks, in address order
        self.used = 0  # bytes handed out by alloc()
        self.size = 0  # bytes the arena holds when awake: a whole number of chunks

    @property
    def mapped(self) -> int:
        return len(self.chunks) * self.chunk_size

    def chunks_needed(self, nbytes: int) -> int:
        """How many more chunks must be mapped for ``nbytes`` more of alloc()."""
        end = _align(self.used) + nbytes
        return max(0, -(-end // self.chunk_size) - len(self.chunks))

    def map(self, chunks: list) -> None:
        """Map ``chunks`` after those already mapped. If one fails, those not
        mapped are released; those mapped stay, for unmap() to take back."""
        done = 0
        try:
            if self.mapped + len(chunks) * self.chunk_size > self.capacity:
                raise ValueError("arena capacity exceeded")
            for chunk in chunks:
                self.backend.map(chunk, self.base + self.mapped, self.prefault)
                self.chunks.append(chunk)
                done += 1
        except BaseException:
            for chunk in chunks[done:]:
                self.backend.release(chunk)
            raise
        self.size = max(self.size, self.mapped)

    def unmap(self) -> list:
        """Unmap every chunk and return them; the range stays reserved."""
        self.backend.synchronize()
        chunks, self.chunks = self.chunks, []
        if chunks:
            self.backend.unmap(self.base, len(chunks) * self.chunk_size)
        for chunk in chunks:
            self.backend.release(chunk)
        return chunks

    def alloc(self, nbytes: int):
        """A uint8 tensor of ``nbytes`` from mapped memory, ALIGN-aligned."""
        start = _align(self.used)
        if start + nbytes > self.mapped:
            raise MemoryError(f"arena has {self.mapped - start} mapped bytes, {nbytes} asked")
        self.used = start + nbytes
        return self.backend.tensor(self.base + start, nbytes)

    def view(self, nbytes: int | None = None):
        """A uint8 tensor over the first ``nbytes`` (default: all used bytes)."""
        return self.backend.tensor(self.base, self.used if nbytes is None else nbytes)

    def close(self) -> None:
        self.unmap()
        self.backend.free(self.base, self.capacity)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
