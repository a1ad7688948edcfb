"""A test PACS built with pynetdicom that misbehaves on demand: chosen C-STORE statuses, rejected associations,
a handler that hangs, SOP classes it does not accept. Loopback only, in the test's own process.

DCMTK's storescp covers the aborts (``--abort-after``, ``--abort-during``); this peer covers what storescp
cannot be told to do.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import uid as pduid
from pynetdicom import AE, StoragePresentationContexts, evt

from tests.peers import free_port, port_open, wait_for

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
_SYNTAXES = [pduid.ExplicitVRLittleEndian, pduid.ImplicitVRLittleEndian]


@dataclass(frozen=True)
class Received:
    sop_class_uid: str
    sop_instance_uid: str
    status: int  # what we answered


class FaultSCP:
    """A Storage SCP whose answers a test scripts.

    ``statuses``: SOP Class UID (or "*" for any) -> statuses answered in turn, the last one repeated.
    ``refuse_classes``: SOP classes whose presentation contexts are not accepted.
    ``require_calling``: only these calling AE titles may associate (others are rejected).
    The called AE title must match ``ae_title``. ``hang()`` makes every C-STORE block until ``release()``.
    """

    def __init__(
        self,
        *,
        ae_title: str = "PACS",
        port: int | None = None,
        statuses: dict[str, Sequence[int]] | None = None,
        refuse_classes: Iterable[str] = (),
        require_calling: Sequence[str] = (),
    ) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self._script = {k: list(v) for k, v in (statuses or {}).items()}
        self.refuse_classes = set(refuse_classes)
        self.require_calling = list(require_calling)
        self.received: list[Received] = []
        self.store_started = threading.Event()  # set when a C-STORE request reached the handler
        self._hang = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server: Any = None

    # ---- behaviour ---------------------------------------------------------------------------------------

    def set_statuses(self, statuses: dict[str, Sequence[int]]) -> None:
        with self._lock:
            self._script = {k: list(v) for k, v in statuses.items()}

    def hang(self) -> None:
        self._release.clear()
        self._hang.set()

    def release(self) -> None:
        self._hang.clear()
        self._release.set()

    def _next_status(self, sop_class: str) -> int:
        with self._lock:
            script = self._script.get(sop_class) or self._script.get("*")
            if not script:
                return 0x0000
            return script.pop(0) if len(script) > 1 else script[0]

    def _on_store(self, event: Any) -> int:
        req = event.request
        sop_class, sop_uid = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
        self.store_started.set()
        if self._hang.is_set():
            self._release.wait(60)  # far beyond any dimse_timeout a test sets
        status = self._next_status(sop_class)
        with self._lock:
            self.received.append(Received(sop_class, sop_uid, status))
        return status

    def stored(self, sop_class: str | None = None) -> list[str]:
        """SOP Instance UIDs answered with success (or warning), optionally of one class."""
        with self._lock:
            return [
                r.sop_instance_uid
                for r in self.received
                if (sop_class is None or r.sop_class_uid == sop_class) and (r.status == 0 or r.status >> 12 == 0xB)
            ]

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FaultSCP:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        if self.require_calling:
            ae.require_calling_aet = self.require_calling
        ae.network_timeout = 30
        ae.dimse_timeout = 30
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax not in self.refuse_classes:
                ae.add_supported_context(cx.abstract_syntax, _SYNTAXES)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        wait_for(lambda: port_open(self.port), 10, f"fault SCP on port {self.port}")
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
