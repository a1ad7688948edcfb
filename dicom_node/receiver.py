"""The listener's network side: accept associations, negotiate, receive C-STORE and C-ECHO.

One thread per association does blocking reads: a P-DATA fragment goes from the socket buffer straight
to the instance's temp file, and the response goes out as soon as the instance is durable. Negotiation
(once per association) answers plain requests directly (association_rq, checked byte for byte against
pynetdicom) and leaves the rest to pynetdicom's PDU classes and presentation-context negotiation against
the AE built in scp.py, so what is accepted is exactly what that AE supports.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPDU
from pynetdicom.pdu import A_ASSOCIATE_RJ as AssociateRjPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_acceptor

from dicom_node import upper_layer as ul
from dicom_node.association_rq import APPLICATION_CONTEXT
from dicom_node.association_rq import accept as accept_plain_request
from dicom_node.association_rq import parse as parse_plain_request
from dicom_node.group_commit import GroupCommitter
from dicom_node.handlers import (
    CANNOT_UNDERSTAND,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    OUT_OF_RESOURCES,
    SUCCESS,
    IncomingInstance,
    RejectedInstance,
    StoreSettings,
)
from dicom_node.logs import log_event
from dicom_node.security import ListenerGuard
from dicom_node.shared_counts import SharedCounts
from storage.files import FileStore

log = logging.getLogger("dicom_node.listener")

MAX_PDU_ACCEPTED = 64 << 20  # peers must respect our maximum; a little slack, never unbounded
UNRECOGNISED_OPERATION = 0x0211


@dataclass(frozen=True)
class Limits:
    max_pdu_size: int
    max_associations: int
    acse_timeout: float
    network_timeout: float


@dataclass(frozen=True)
class _Accepted:
    """What an A-ASSOCIATE-RQ was answered with. The answer depends only on the request's bytes and the
    config, so a repeated request reuses it (a plain request costs ~1 ms to answer directly, see
    association_rq; one left to pynetdicom 50-150 ms). Access checks still run on every association."""

    calling_ae: str
    called_ae: str
    accept_pdu: bytes
    contexts: dict[int, tuple[str, str]]


ACCEPT_CACHE_SIZE = 64


class _Sink:
    """Where the dataset of a command that is not a C-STORE goes: nowhere."""

    def write(self, data: memoryview) -> None:
        return None


class ReceiveServer:
    """Accepts associations on ``address`` until ``shutdown``; ``server_address`` is the bound (host, port)."""

    def __init__(self, ae: AE, address: tuple[str, int], files: FileStore, committer: GroupCommitter,
                 settings: StoreSettings, limits: Limits, *, guard: ListenerGuard | None = None,
                 sock: socket.socket | None = None, counts: SharedCounts | None = None) -> None:
        """``sock``: an already listening socket (one shared by several listener processes), else one is
        bound to ``address``. ``counts``: the node-wide association counts when there are such processes."""
        self.ae = ae
        self.guard = guard or ListenerGuard.from_ae(ae, max_pdu_size=limits.max_pdu_size,
                                                    max_associations=limits.max_associations,
                                                    acse_timeout=limits.acse_timeout)
        self.files = files
        self.committer = committer
        self.settings = settings
        self.limits = limits
        self.counts = counts
        self.owns_socket = sock is None  # a shared socket stays open for the other listener processes
        self.sock = sock if sock is not None else bind_listener(address)
        # Blocking accept: the kernel hands each new connection to the process that has waited longest, so
        # listener processes sharing the socket take turns. shutdown() wakes it.
        self.sock.settimeout(None)
        self.server_address = self.sock.getsockname()[:2]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self.accepted_cache: dict[bytes, _Accepted] = {}
        self.supported = supported_syntaxes(ae)
        self._thread = threading.Thread(target=self._accept_loop, name="listener", daemon=True)

    def start(self) -> ReceiveServer:
        self._thread.start()
        return self

    def remember_accept(self, request: bytes, accepted: _Accepted) -> None:
        if len(self.accepted_cache) >= ACCEPT_CACHE_SIZE:
            self.accepted_cache.clear()
        self.accepted_cache[request] = accepted

    def active_associations(self) -> int:
        """Open connections node-wide (all listener processes), which the limits apply to."""
        if self.counts is not None:
            return self.counts.total()
        with self._lock:
            return len(self._active)

    def _listening(self) -> bool:
        return bool(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def _publish(self) -> None:
        if self.counts is not None:
            self.counts.publish(len(self._active))

    def _accept_loop(self) -> None:
        # A shared socket is put in listening state by the pool once every listener process is ready, so
        # that the first connections are not all taken by the first process to start.
        while not self.owns_socket and not self._stop.is_set() and not self._listening():
            self._stop.wait(0.005)
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                if exc.errno == errno.EINVAL:  # the shared socket was shut down: the node is stopping
                    log_event(log, "listener_closed")
                    return
                # e.g. out of file descriptors: keep the listener alive and try again shortly
                log_event(log, "accept_failed", logging.WARNING, error=str(exc) or type(exc).__name__)
                self._stop.wait(0.1)
                continue
            if self._stop.is_set():  # accepted while stopping (a shared socket is not shut down): refuse
                conn.close()
                return
            conn.settimeout(None)
            if not self.guard.admit(self.active_associations(), peer):
                conn.close()
                continue
            conn = self.guard.wrap(conn)  # TLS without I/O: the handshake runs in the connection's thread
            t = threading.Thread(target=self._serve, args=(conn, peer), name=f"assoc-{peer[1]}", daemon=True)
            with self._lock:
                self._active[id(conn)] = (conn, t)
                self._publish()
            t.start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            if self.guard.handshake(conn, peer):
                _Association(self, conn, f"{peer[0]}:{peer[1]}").run()
        except Exception:  # one broken association must not take the listener down
            log.exception("association_failed")
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._active.pop(id(conn), None)
                self._publish()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort open associations (unacknowledged instances are not kept) and wait."""
        self._stop.set()
        if self.owns_socket:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocking accept
            with contextlib.suppress(OSError):
                self.sock.close()
            if self._thread.is_alive():
                self._thread.join(timeout)
        # else: shutting a shared socket down would stop every listener process; this one's accept thread
        # (a daemon) stays blocked until the process exits, and refuses anything it still accepts

        with self._lock:
            active = list(self._active.values())
        for conn, _ in active:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, t in active:
            t.join(timeout)
        self.committer.close()


LISTEN_BACKLOG = 128


def supported_syntaxes(ae: AE) -> dict[str, tuple[str, ...]]:
    """{abstract syntax: transfer syntaxes} of ``ae``'s supported contexts: what association_rq accepts."""
    return {str(cx.abstract_syntax): tuple(str(ts) for ts in cx.transfer_syntax) for cx in ae.supported_contexts}


def pynetdicom_accept(rq: A_ASSOCIATE, ae: AE, max_pdu: int) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """The A-ASSOCIATE-AC for a decoded request, negotiated by pynetdicom against ``ae``'s contexts, and the
    accepted contexts; for the requests ``association_rq`` leaves to it."""
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
    result, ac_roles = negotiate_as_acceptor(rq.presentation_context_definition_list, ae.supported_contexts, roles)
    contexts = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in result if cx.result == 0x00}
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result, ac.result_source = 0x00, 0x01
    ac.presentation_context_definition_results_list = result
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION
    ac.user_information = [max_len, impl_uid, impl_name, *ac_roles]
    out = AssociateAcPDU()
    out.from_primitive(ac)
    return out.encode(), contexts


def bind_listener(address: tuple[str, int], *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``address`` (IPv6 when the host has a colon), listening unless told not to."""
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if listen:
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class _Association:
    def __init__(self, server: ReceiveServer, conn: socket.socket, peer: str) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.calling_ae = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # context id -> (abstract syntax, transfer syntax)
        self.buf = bytearray(max(server.limits.max_pdu_size, 16384) + 16)
        self.spare: tuple[int, Path] | None = None  # the next instance's temp file, made ahead

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    # ---- association setup -----------------------------------------------------------------------------

    def run(self) -> None:
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.settimeout(self.server.limits.acse_timeout)
        stream = self.conn.makefile("rb", buffering=1 << 16)
        try:
            pdu_type, length = ul.read_pdu_header(stream)
            if pdu_type != ul.A_ASSOCIATE_RQ or length > 1 << 20:
                self.send(ul.abort(0x02, 0x02))
                return
            body = bytearray(length)
            ul.read_exact(stream, memoryview(body))
            if not self._negotiate(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + bytes(body)):
                return
            self.conn.settimeout(self.server.limits.network_timeout)
            self._receive(stream)
        except ul.PeerClosed:
            if not self.contexts:  # closed before an association existed: a port probe or health check
                log_event(log, "connection_closed", logging.DEBUG, peer=self.peer)
            else:
                log_event(log, "association_aborted", logging.WARNING, calling_ae=self.calling_ae, peer=self.peer,
                          reason="connection closed")
        except ul.ProtocolError as exc:
            log_event(log, "association_aborted", logging.WARNING, calling_ae=self.calling_ae, peer=self.peer,
                      reason=str(exc))
            with contextlib.suppress(OSError):
                self.send(ul.abort(0x02, 0x00))
        except OSError as exc:  # reset, timeout, shutdown
            log_event(log, "association_aborted", logging.WARNING, calling_ae=self.calling_ae, peer=self.peer,
                      reason=str(exc) or type(exc).__name__)
        finally:
            stream.close()

    def _negotiate(self, raw: bytes) -> bool:
        cached = self.server.accepted_cache.get(raw)
        plain = rq = None
        if cached is not None:  # same request as before (same peer software, same files): same answer
            self.calling_ae, called = cached.calling_ae, cached.called_ae
        elif (plain := parse_plain_request(raw)) is not None:
            self.calling_ae, called = plain.calling_title, plain.called_title
        else:
            pdu = AssociateRqPDU()
            try:
                pdu.decode(raw)
                rq = pdu.to_primitive()
            except Exception as exc:  # pynetdicom's decoder raises anything (AssertionError, IndexError...)
                raise ul.ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
            self.calling_ae = str(rq.calling_ae_title).strip()
            called = str(rq.called_ae_title).strip()
        reject: tuple[int, int, int] | None = None
        refused = self.server.guard.check_association(self.calling_ae, called, self.peer.rsplit(":", 1)[0])
        if refused is not None:  # AE titles and host allow-list: see security.AccessPolicy
            reject, why = (refused.result, refused.source, refused.reason), refused.why
        if self.server.active_associations() > self.server.limits.max_associations:
            reject, why = (0x02, 0x03, 0x02), "too_many_associations"
        if reject is not None:
            rj = A_ASSOCIATE()
            rj.result, rj.result_source, rj.diagnostic = reject
            out = AssociateRjPDU()
            out.from_primitive(rj)
            self.send(out.encode())
            log_event(log, "association_rejected", logging.WARNING, calling_ae=self.calling_ae, called_ae=called,
                      peer=self.peer, reason=why)
            return False
        if cached is None:  # negotiated only for peers that passed the checks
            max_pdu = self.server.limits.max_pdu_size
            if plain is not None:
                accept_pdu, contexts = accept_plain_request(
                    plain, self.server.supported, max_pdu=max_pdu, implementation_uid=IMPLEMENTATION_UID,
                    implementation_version=IMPLEMENTATION_VERSION)
            else:
                assert rq is not None
                accept_pdu, contexts = pynetdicom_accept(rq, self.server.ae, max_pdu)
            cached = _Accepted(self.calling_ae, called, accept_pdu, contexts)
            self.server.remember_accept(raw, cached)
        self.contexts = dict(cached.contexts)
        self.send(cached.accept_pdu)
        log_event(log, "association_accepted", logging.DEBUG, calling_ae=self.calling_ae, peer=self.peer,
                  contexts=len(self.contexts), pid=os.getpid())
        return True

    # ---- messages --------------------------------------------------------------------------------------

    def _receive(self, stream: BinaryIO) -> None:
        command = bytearray()
        cmd: dict[int, bytes] | None = None
        cmd_ctx = 0
        sink: IncomingInstance | _Sink | None = None
        try:
            while True:
                pdu_type, length = ul.read_pdu_header(stream)
                if length > MAX_PDU_ACCEPTED or self.server.guard.pdu_too_large(length):
                    raise ul.ProtocolError(f"PDU of {length} bytes exceeds the announced maximum")
                if length > len(self.buf):
                    self.buf = bytearray(length)
                body = memoryview(self.buf)[:length]
                ul.read_exact(stream, body)
                if pdu_type == ul.A_RELEASE_RQ:
                    self._drop_spare()  # before answering: once released the peer may look at the store
                    self.send(ul.release_rp())
                    return
                if pdu_type == ul.A_ABORT:
                    log_event(log, "association_aborted", logging.WARNING, calling_ae=self.calling_ae,
                              peer=self.peer, reason="peer aborted")
                    return
                if pdu_type != ul.P_DATA_TF:
                    raise ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                for pdv in ul.iter_pdvs(body):
                    if pdv.context_id not in self.contexts:
                        raise ul.ProtocolError(f"PDV on presentation context {pdv.context_id}, not accepted")
                    if pdv.is_command:
                        if cmd is not None:
                            raise ul.ProtocolError("command fragment while a dataset was expected")
                        command += body[pdv.start:pdv.end]
                        if not pdv.is_last:
                            continue
                        cmd, cmd_ctx = ul.parse_command(bytes(command)), pdv.context_id
                        command.clear()
                        if ul.command_us(cmd, 0x0800) == ul.NO_DATASET:
                            self._dispatch(cmd, cmd_ctx, None)
                            cmd = None
                        else:
                            sink = self._sink_for(cmd, cmd_ctx)
                        continue
                    if cmd is None or sink is None:
                        raise ul.ProtocolError("dataset fragment without a command")
                    sink.write(body[pdv.start:pdv.end])
                    if pdv.is_last:
                        done, sink = sink, None
                        self._dispatch(cmd, cmd_ctx, done)
                        cmd = None
        finally:
            if isinstance(sink, IncomingInstance):
                sink.discard()  # aborted mid-dataset: nothing was acknowledged, nothing is kept
            self._drop_spare()

    def _sink_for(self, cmd: dict[int, bytes], ctx: int) -> IncomingInstance | _Sink:
        if ul.command_us(cmd, 0x0100) != ul.C_STORE_RQ:
            return _Sink()
        spare, self.spare = self.spare, None
        return IncomingInstance(self.server.files, self.server.settings, command_sop_uid=cmd.get(0x1000, b""),
                                command_class_uid=cmd.get(0x0002, b""), transfer_syntax=self.contexts[ctx][1],
                                calling_ae=self.calling_ae, temp=spare)

    def _prepare_spare(self) -> None:
        """Make the next instance's temp file now, while the peer is still preparing that instance: creating
        a file costs ~0.03 ms of kernel time, up to 0.3 ms on ext4 without a journal soon after mass deletions,
        which this takes off the wait between two instances."""
        if self.spare is None:
            try:
                self.spare = self.server.files.open_temp()
            except OSError:
                self.spare = None  # the next instance tries itself and answers a failure status if need be

    def _drop_spare(self) -> None:
        if self.spare is not None:
            spare, self.spare = self.spare, None
            self.server.files.discard_temp(*spare)

    def _dispatch(self, cmd: dict[int, bytes], ctx: int, data: IncomingInstance | _Sink | None) -> None:
        field = ul.command_us(cmd, 0x0100) or 0
        msg_id = ul.command_us(cmd, 0x0110) or 0
        sop_class = cmd.get(0x0002, b"")
        if field == ul.C_ECHO_RQ:
            self.send(ul.p_data_command(ctx, ul.encode_response(field, msg_id, SUCCESS, sop_class, None)))
            return
        sop = cmd.get(0x1000, b"")
        if field != ul.C_STORE_RQ:
            status, comment = UNRECOGNISED_OPERATION, "only C-STORE and C-ECHO are served"
        elif not isinstance(data, IncomingInstance):
            status, comment = CANNOT_UNDERSTAND, "C-STORE without a dataset"
        else:
            status, comment = self._store(data)
        self.send(ul.p_data_command(ctx, ul.encode_response(field, msg_id, status, sop_class, sop, comment)))
        if field == ul.C_STORE_RQ:
            self._prepare_spare()

    def _store(self, incoming: IncomingInstance) -> tuple[int, str]:
        sop_uid = incoming.sop_uid
        try:
            status, outcome = self.server.committer.commit(incoming.finish())
        except RejectedInstance as exc:
            status, outcome = exc.status, exc.comment
        except Exception as exc:  # a handler must answer a status, never crash the association
            incoming.discard()
            log.exception("store_failed", extra={"fields": {"sop_instance_uid": sop_uid[:80]}})
            return OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
        if status != SUCCESS:
            log_event(log, "instance_rejected", logging.WARNING, sop_instance_uid=sop_uid[:80],
                      status=f"0x{status:04X}", reason=outcome, calling_ae=self.calling_ae)
            return status, outcome
        if outcome != "stored":
            log_event(log, "instance_" + outcome, sop_instance_uid=sop_uid, calling_ae=self.calling_ae)
        else:
            log_event(log, "instance_stored", logging.DEBUG, sop_instance_uid=sop_uid, calling_ae=self.calling_ae)
        return SUCCESS, ""
