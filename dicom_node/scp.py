"""The listener: one pynetdicom AE accepting C-ECHO and C-STORE for every storage SOP class.

Transfer syntaxes offered are those pydicom can decode here (uncompressed, deflated, JPEG family, JPEG-LS,
JPEG 2000, RLE), so the worker can read whatever was accepted. Bytes are stored as received.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pydicom import uid as pduid
from pydicom.pixels import get_decoder
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Config
from dicom_node.handlers import Handlers, StoreSettings
from dicom_node.logs import log_event
from storage.files import FileStore
from storage.jobstore import JobStore

log = logging.getLogger("dicom_node.listener")

_NATIVE = [
    pduid.ExplicitVRLittleEndian,
    pduid.ImplicitVRLittleEndian,
    pduid.DeflatedExplicitVRLittleEndian,
    pduid.ExplicitVRBigEndian,
]
_COMPRESSED = [
    pduid.JPEGBaseline8Bit, pduid.JPEGExtended12Bit, pduid.JPEGLossless, pduid.JPEGLosslessSV1,
    pduid.JPEGLSLossless, pduid.JPEGLSNearLossless, pduid.JPEG2000Lossless, pduid.JPEG2000,
    pduid.RLELossless, pduid.HTJ2KLossless, pduid.HTJ2KLosslessRPCL, pduid.HTJ2K,
]


def decodable_transfer_syntaxes() -> list[str]:
    """Native syntaxes plus every compressed one with a pixel decoder installed."""
    out = [str(u) for u in _NATIVE]
    for ts in _COMPRESSED:
        try:
            if get_decoder(ts).is_available:
                out.append(str(ts))
        except NotImplementedError:
            continue
    return out


def set_nodelay(event: Any) -> None:
    """Disable Nagle's algorithm: small DIMSE responses otherwise wait ~40 ms for an ACK."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        log_event(log, "nodelay_failed", logging.DEBUG, error=str(exc))


def _log_rejected(event: Any) -> None:
    a = event.assoc
    log_event(log, "association_rejected", logging.WARNING, calling_ae=a.requestor.ae_title,
              called_ae=a.acceptor.ae_title, peer=f"{a.requestor.address}:{a.requestor.port}")


def _log_aborted(event: Any) -> None:
    a = event.assoc
    log_event(log, "association_aborted", logging.WARNING, calling_ae=a.requestor.ae_title,
              peer=f"{a.requestor.address}:{a.requestor.port}")


def build_ae(cfg: Config) -> AE:
    n = cfg.node
    ae = AE(ae_title=n.ae_title)
    ae.maximum_associations = n.max_associations
    ae.maximum_pdu_size = n.max_pdu_size
    ae.acse_timeout = n.acse_timeout
    ae.dimse_timeout = n.dimse_timeout
    ae.network_timeout = n.network_timeout
    ae.require_called_aet = cfg.security.require_called_ae_title
    ae.require_calling_aet = list(cfg.security.allowed_calling_ae_titles)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes[:2])
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)
    return ae


def start_listener(cfg: Config, files: FileStore, jobs: JobStore) -> tuple[AE, ThreadedAssociationServer]:
    """Start accepting associations in background threads; returns (ae, server)."""
    ae = build_ae(cfg)
    handlers = Handlers(files, jobs, StoreSettings(
        late_arrivals=cfg.completion.late_arrivals,
        duplicate_policy=cfg.node.duplicate_policy,
        max_instance_bytes=cfg.node.max_instance_mb << 20,
    ))
    server = ae.start_server(
        (cfg.node.bind, cfg.node.port), block=False,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_ECHO, handlers.on_echo),
            (evt.EVT_C_STORE, handlers.on_store),
            (evt.EVT_REJECTED, _log_rejected),
            (evt.EVT_ABORTED, _log_aborted),
        ],
    )
    assert server is not None
    log_event(log, "listener_started", ae_title=cfg.node.ae_title, bind=cfg.node.bind,
              port=server.server_address[1], transfer_syntaxes=len(ae.supported_contexts[0].transfer_syntax)
              if ae.supported_contexts else 0)
    return ae, server
