"""Association counts shared by the node's listener processes, so limits apply to the whole node.

A small shared memory file (memfd) holds two counters per listener process, its accepted associations and
its connections still negotiating; each process writes only its own slot and reads the sums. Reads race
with writes by design: a limit may be passed by the number of associations that arrive in the same instant,
as with any accept-then-count scheme.
"""

from __future__ import annotations

import mmap
import os
import struct

_SLOT = struct.Struct("<ii")  # (accepted associations, negotiating connections)


class SharedCounts:
    def __init__(self, fd: int, slots: int, slot: int) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} outside 0..{slots - 1}")
        self.fd = fd
        self.slots = slots
        self.slot = slot
        self._map = mmap.mmap(fd, slots * _SLOT.size)

    @classmethod
    def create(cls, slots: int) -> SharedCounts:
        """A new zeroed table (in the parent); children open it with the fd and their slot number."""
        fd = os.memfd_create("dicom-node-associations", 0)
        os.ftruncate(fd, slots * _SLOT.size)
        return cls(fd, slots, 0)

    def publish(self, associations: int, negotiating: int = 0) -> None:
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, associations, negotiating)

    def clear(self, slot: int) -> None:
        """Zero a slot whose process is gone (the parent, when a listener process exits)."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, 0, 0)

    def total(self) -> int:
        """Accepted associations, node-wide."""
        return sum(_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.slots))

    def negotiating(self) -> int:
        """Connections not yet associated, node-wide."""
        return sum(_SLOT.unpack_from(self._map, i * _SLOT.size)[1] for i in range(self.slots))

    def close(self) -> None:
        """Unmap the table and close this process's fd of it."""
        self._map.close()
        os.close(self.fd)
