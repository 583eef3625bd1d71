"""Which chunks this process has mapped where, for devices that map and
unmap an allocation only whole (CUDA's cuMemMap/cuMemUnmap, CANN's
aclrtMapMem/aclrtUnmapMem): their backends' ``unmap(addr, size)`` undoes
the whole mappings inside a range, one driver call each, and refuses a
range that would cut one in two."""

import threading


class Mappings:
    def __init__(self, device: str):
        self.device = device  # for messages: "CUDA", "CANN"
        self.lock = threading.Lock()  # held around the driver calls by the backends
        self._sizes: dict[int, int] = {}  # address -> size of each mapped chunk

    def add(self, addr: int, size: int) -> None:
        self._sizes[addr] = size

    def remove(self, addr: int) -> None:
        del self._sizes[addr]

    def inside(self, addr: int, size: int) -> list[tuple[int, int]]:
        """The (address, size) of each mapping in ``[addr, addr + size)``;
        ValueError if the range cuts one."""
        end, found = addr + size, []
        for start, length in sorted(self._sizes.items()):
            if start >= end or start + length <= addr:
                continue
            if start < addr or start + length > end:
                raise ValueError(
                    f"unmap of [{addr:#x}, {end:#x}) would cut the chunk mapped at "
                    f"[{start:#x}, {start + length:#x}): {self.device} unmaps whole chunks only"
                )
            found.append((start, length))
        return found
