"""The listener: one pynetdicom AE accepting C-ECHO and C-STORE for every storage SOP class.

Transfer syntaxes offered are those pydicom can decode here (uncompressed, deflated, JPEG family, JPEG-LS,
JPEG 2000, RLE), so the worker can read whatever was accepted. Bytes are stored as received.
pynetdicom's AE is used for what it describes (contexts, AE-title rules); server.py moves the bytes.
"""

from __future__ import annotations

import logging
import os
import socket

from pydicom import uid as pduid
from pydicom.pixels import get_decoder
from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import, not declared

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.housekeeping import Housekeeper, SpaceKeeper
from dicom_node.jobs.routing import VOLUME_SOP_CLASSES
from dicom_node.logs import log_event
from dicom_node.receive.access import ListenerGuard
from dicom_node.receive.group_commit import GroupCommitter
from dicom_node.receive.incoming import StoreSettings
from dicom_node.receive.server import Limits, ReceiveServer
from dicom_node.receive.shared_counts import SharedCounts
from storage.files import FileStore
from storage.jobstore import JobStore
from storage.retention import RetentionStore

log = logging.getLogger("dicom_node.listener")

_NATIVE = [
    pduid.ExplicitVRLittleEndian,
    pduid.ImplicitVRLittleEndian,
    pduid.DeflatedExplicitVRLittleEndian,
    pduid.ExplicitVRBigEndian,
]
_COMPRESSED = [
    pduid.JPEGBaseline8Bit,
    pduid.JPEGExtended12Bit,
    pduid.JPEGLossless,
    pduid.JPEGLosslessSV1,
    pduid.JPEGLSLossless,
    pduid.JPEGLSNearLossless,
    pduid.JPEG2000Lossless,
    pduid.JPEG2000,
    pduid.RLELossless,
    pduid.HTJ2KLossless,
    pduid.HTJ2KLosslessRPCL,
    pduid.HTJ2K,
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


def build_ae(cfg: Config) -> AE:
    """The presentation contexts the node accepts, held on a pynetdicom AE for its negotiation code. The AE
    never runs an association: ReceiveServer does, with limits and timeouts from ``Limits`` and AE-title
    rules from ``ListenerGuard``."""
    ae = AE(ae_title=cfg.node.ae_title)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes[:2])
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:  # set in every one of pynetdicom's contexts; typed Optional
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    return ae


def store_settings(cfg: Config) -> StoreSettings:
    return StoreSettings(
        late_arrivals=cfg.completion.late_arrivals,
        reopen_classes=VOLUME_SOP_CLASSES,
        duplicate_policy=cfg.node.duplicate_policy,
        max_instance_bytes=cfg.node.max_instance_mb << 20,
    )


def start_listener(
    cfg: Config,
    files: FileStore,
    jobs: JobStore,
    *,
    sock: socket.socket | None = None,
    counts: SharedCounts | None = None,
) -> tuple[AE, ReceiveServer]:
    """Start accepting associations in background threads; returns (ae, server).

    The AE holds the supported presentation contexts used for negotiation; the ReceiveServer does the
    transfer (see server.py for why it is not pynetdicom's own server). ``sock`` and ``counts``: a listening
    socket and association counts shared with other listener processes.
    """
    ae = build_ae(cfg)
    n = cfg.node
    settings = store_settings(cfg)
    if cfg.retention.enabled and files.guard is None:  # evict finished studies before refusing for space
        files.guard = SpaceKeeper(Housekeeper(cfg, files, RetentionStore(jobs.engine, files)))
    server = ReceiveServer(
        ae,
        (n.bind, n.port),
        files,
        GroupCommitter(files, jobs.engine, settings),
        settings,
        Limits(
            max_pdu_size=n.max_pdu_size,
            max_associations=n.max_associations,
            acse_timeout=n.acse_timeout,
            network_timeout=n.network_timeout,
            dimse_timeout=n.dimse_timeout,
        ),
        guard=ListenerGuard.from_config(cfg),
        sock=sock,
        counts=counts,
        audit=AuditLog.from_config(cfg),
    ).start()
    log_event(
        log,
        "listener_started",
        ae_title=n.ae_title,
        bind=n.bind,
        port=server.server_address[1],
        sop_classes=len(ae.supported_contexts),  # the storage classes, and Verification
        transfer_syntaxes=len({ts for cx in ae.supported_contexts for ts in cx.transfer_syntax}),
        pid=os.getpid(),
    )
    return ae, server
