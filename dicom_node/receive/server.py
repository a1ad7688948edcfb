# Replaces pynetdicom's server: 6-10x (~100 -> 594-1046 inst/s); pynetdicom + DCMTK peers: integration/test_listener.py
"""The listener's network side: accept associations, negotiate, receive C-STORE and C-ECHO.

One thread per association does blocking reads: a P-DATA fragment goes from the socket buffer straight
to the instance's temp file, and the response goes out as soon as the instance is durable. Negotiation
(once per association, the answer cached per distinct request) is pynetdicom's PDU classes and
presentation-context negotiation against the AE built in listener.py, so what is accepted is exactly what
that AE supports. The protocol version, AE titles, access policy and association limit are checked from the
request's fixed header first, so a refused peer costs no decoding.

What a peer can hold is bounded: a command set to ``MAX_COMMAND_BYTES``; the whole A-ASSOCIATE-RQ to
``acse_timeout``, each PDU to ``network_timeout`` and each DIMSE message to ``dimse_timeout`` from its first
byte (deadlines, enforced by one watchdog thread that cuts the socket, so the hot path only notes times);
connections still negotiating are counted apart from accepted associations and capped, the oldest cut first.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
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

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.logs import log_event
from dicom_node.receive import upper_layer as ul
from dicom_node.receive.access import (
    REASON_CALLED_AE_NOT_RECOGNISED,
    REASON_CALLING_AE_NOT_RECOGNISED,
    REASON_PROTOCOL_VERSION,
    REJECTED_PERMANENT,
    SOURCE_ACSE_PROVIDER,
    SOURCE_SERVICE_USER,
    ListenerGuard,
    ae_title,
)
from dicom_node.receive.group_commit import GroupCommitter
from dicom_node.receive.incoming import (
    CANNOT_UNDERSTAND,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    OUT_OF_RESOURCES,
    SUCCESS,
    IncomingInstance,
    RejectedInstance,
    StoreSettings,
)
from dicom_node.receive.shared_counts import SharedCounts
from storage.files import FileStore

log = logging.getLogger("dicom_node.listener")

MAX_PDU_ACCEPTED = 64 << 20  # peers must respect our maximum; a little slack, never unbounded
MAX_REQUEST_BYTES = 1 << 20  # an A-ASSOCIATE-RQ; DCMTK's 128 contexts take ~12 KiB
MAX_COMMAND_BYTES = 4096  # a command set; real ones are ~200 bytes
WATCHDOG_INTERVAL = 0.1  # how often deadlines are looked at: the precision of every timeout below
UNRECOGNISED_OPERATION = 0x0211
_NEVER = float("inf")


ARTIM_SECONDS = 2.0  # how long a refused peer gets to read the rejection and close (PS3.8 ARTIM timer)


@dataclass(frozen=True)
class Limits:
    max_pdu_size: int
    max_associations: int
    acse_timeout: float  # the whole A-ASSOCIATE-RQ, from the connection's first moment
    network_timeout: float  # silence between PDUs; and each PDU, from its first byte to its last
    dimse_timeout: float  # each DIMSE message (command and dataset), from its first PDU to its last


@dataclass(frozen=True)
class _Accepted:
    """What an A-ASSOCIATE-RQ was answered with. The answer depends only on the request's bytes and the
    config, so a repeated request reuses it (pynetdicom takes 12-28 ms to negotiate storescu's 128 proposed
    contexts, a cached answer 0.2-0.6 ms). Access checks still run on every association."""

    accept_pdu: bytes
    contexts: dict[int, tuple[str, str]]


ACCEPT_CACHE_SIZE = 64


class _Sink:
    """Where the dataset of a command that is not a C-STORE goes: nowhere."""

    def write(self, data: memoryview) -> None:
        return None


class ReceiveServer:
    """Accepts associations on ``address`` until ``shutdown``; ``server_address`` is the bound (host, port)."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        files: FileStore,
        committer: GroupCommitter,
        settings: StoreSettings,
        limits: Limits,
        *,
        guard: ListenerGuard,
        sock: socket.socket | None = None,
        counts: SharedCounts | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        """``sock``: an already listening socket (one shared by several listener processes), else one is
        bound to ``address``. ``counts``: the node-wide association counts when there are such processes.
        ``audit``: where each association's record goes (one line when it ends)."""
        self.audit = audit
        self.ae = ae
        self.guard = guard
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
        # connections still negotiating, oldest first (dicts keep insertion order), and accepted associations
        self._negotiating: dict[int, _Association] = {}
        self._associations: dict[int, _Association] = {}
        self.accepted_cache: dict[bytes, _Accepted] = {}
        self._thread = threading.Thread(target=self._accept_loop, name="listener", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="listener-watchdog", daemon=True)

    def start(self) -> ReceiveServer:
        self._thread.start()
        self._watchdog.start()
        return self

    def remember_accept(self, request: bytes, accepted: _Accepted) -> None:
        if len(self.accepted_cache) >= ACCEPT_CACHE_SIZE:
            self.accepted_cache.clear()
        self.accepted_cache[request] = accepted

    def active_associations(self) -> int:
        """Accepted associations node-wide (all listener processes), which max_associations applies to."""
        if self.counts is not None:
            return self.counts.total()
        with self._lock:
            return len(self._associations)

    def negotiating(self) -> list[str]:
        """This process's connections still negotiating, oldest first (their peers)."""
        with self._lock:
            return [a.peer for a in self._negotiating.values()]

    def _negotiating_total(self) -> int:
        if self.counts is not None:
            return self.counts.negotiating()
        return len(self._negotiating)

    def _listening(self) -> bool:
        return bool(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def _publish(self) -> None:
        """Under ``_lock``."""
        if self.counts is not None:
            self.counts.publish(len(self._associations), len(self._negotiating))

    def try_associate(self, assoc: _Association) -> bool:
        """Count ``assoc`` as an accepted association if the node is below max_associations."""
        with self._lock:
            self._negotiating.pop(id(assoc), None)
            self._associations[id(assoc)] = assoc
            self._publish()
        if self.active_associations() <= self.limits.max_associations:  # counts itself, as the others do it
            return True
        with self._lock:
            self._associations.pop(id(assoc), None)
            self._publish()
        return False

    def _make_room(self, peer: tuple[str, int]) -> bool:
        """Whether a new connection may negotiate: below the cap, or once this process's oldest negotiating
        connection is cut for it (a peer that has taken longest to ask is the likeliest not to be a peer)."""
        if self._negotiating_total() < self.guard.max_negotiating:
            return True
        with self._lock:
            if not self._negotiating:
                oldest = None
            else:
                oldest = self._negotiating.pop(next(iter(self._negotiating)))
                self._publish()
        if oldest is None:
            return self.guard.admit(self._negotiating_total(), peer)  # logs the refusal
        oldest.cut("negotiating_connections_full")
        log_event(
            log,
            "connection_cut",
            logging.WARNING,
            peer=oldest.peer,
            reason="negotiating_connections_full",
            limit=self.guard.max_negotiating,
        )
        return True

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
            if not self._make_room(peer):
                conn.close()
                continue
            conn = self.guard.wrap(conn)  # TLS without I/O: the handshake runs in the connection's thread
            assoc = _Association(self, conn, f"{peer[0]}:{peer[1]}")
            t = threading.Thread(target=self._serve, args=(assoc, peer), name=f"assoc-{peer[1]}", daemon=True)
            with self._lock:
                self._active[id(conn)] = (conn, t)
                self._negotiating[id(assoc)] = assoc
                self._publish()
            t.start()

    def _serve(self, assoc: _Association, peer: tuple[str, int]) -> None:
        conn = assoc.conn
        try:
            if self.guard.handshake(conn, peer):
                assoc.run()
        except Exception:  # one broken association must not take the listener down
            log.exception("association_failed")
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._active.pop(id(conn), None)
                self._negotiating.pop(id(assoc), None)
                self._associations.pop(id(assoc), None)
                self._publish()

    def _watch(self) -> None:
        """Cut every connection whose deadline (see _Association.deadline) has passed."""
        while not self._stop.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()
            with self._lock:
                late = [a for a in (*self._negotiating.values(), *self._associations.values()) if a.deadline < now]
            for assoc in late:
                if assoc.deadline < time.monotonic():  # not met meanwhile
                    assoc.cut(assoc.deadline_name)

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


def pynetdicom_accept(rq: A_ASSOCIATE, ae: AE, max_pdu: int) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """The A-ASSOCIATE-AC for a decoded request, negotiated by pynetdicom against ``ae``'s contexts, and the
    accepted contexts."""
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in rq.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }
    result, ac_roles = negotiate_as_acceptor(rq.presentation_context_definition_list, ae.supported_contexts, roles)
    contexts = {
        cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in result
        if cx.result == 0x00 and cx.context_id is not None  # a context's ID is unset only before negotiation
    }
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT_NAME
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
        # when the watchdog cuts the connection unless the thing named is done by then (TLS handshake and
        # association request together first)
        self.deadline = time.monotonic() + server.limits.acse_timeout
        self.deadline_name = "acse_timeout"
        self.cut_because: str | None = None
        # for the audit record written when the association ends
        self.called_ae = ""
        self.refused: str | None = None
        self.ended = "connection closed"
        self.instances = 0
        self.bytes = 0
        self.started = time.monotonic()

    def cut(self, why: str) -> None:
        """End the connection from another thread: its reads see the end of the stream (the socket is shut
        for reading only, so an A-ABORT can still be sent)."""
        self.cut_because = why
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.conn, socket.SHUT_RD)  # below TLS: SSLSocket.shutdown drops its state

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    # ---- association setup -----------------------------------------------------------------------------

    def run(self) -> None:
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.settimeout(self.server.limits.acse_timeout)
        stream = self.conn.makefile("rb", buffering=1 << 16)
        if not isinstance(stream, io.BufferedReader):  # typeshed says IOBase for a buffer size other than -1 or 1
            raise TypeError(f"socket.makefile('rb') gave a {type(stream).__name__}, not a BufferedReader")
        try:
            pdu_type, length = ul.read_pdu_header(stream)
            if pdu_type != ul.A_ASSOCIATE_RQ or length > MAX_REQUEST_BYTES or length < 68:
                self.send(ul.abort(0x02, 0x02))
                return
            body = bytearray(length)
            ul.read_exact(stream, memoryview(body))
            if not self._negotiate(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + bytes(body)):
                return
            self.deadline = _NEVER
            self.conn.settimeout(self.server.limits.network_timeout)
            self._receive(stream)
        except ul.PeerClosed:
            self.ended = self.cut_because or self.ended
            if self.cut_because is not None:
                log_event(
                    log,
                    "association_aborted",
                    logging.WARNING,
                    calling_ae=self.calling_ae,
                    peer=self.peer,
                    reason=self.cut_because,
                )
                if self.contexts:
                    with contextlib.suppress(OSError):
                        self.send(ul.abort(0x02, 0x00))
            elif not self.contexts:  # closed before an association existed: a port probe or health check
                log_event(log, "connection_closed", logging.DEBUG, peer=self.peer)
            else:
                log_event(
                    log,
                    "association_aborted",
                    logging.WARNING,
                    calling_ae=self.calling_ae,
                    peer=self.peer,
                    reason="connection closed",
                )
        except ul.ProtocolError as exc:
            self.ended = str(exc)
            log_event(
                log, "association_aborted", logging.WARNING, calling_ae=self.calling_ae, peer=self.peer, reason=str(exc)
            )
            with contextlib.suppress(OSError):
                self.send(ul.abort(0x02, 0x00))
        except OSError as exc:  # reset, timeout, shutdown
            self.ended = self.cut_because or str(exc) or type(exc).__name__
            log_event(
                log,
                "association_aborted",
                logging.WARNING,
                calling_ae=self.calling_ae,
                peer=self.peer,
                reason=self.cut_because or str(exc) or type(exc).__name__,
            )
        finally:
            stream.close()
            self._audit()

    def _audit(self) -> None:
        """One record per association request (accepted or refused), none for a bare connection."""
        if self.server.audit is None or not (self.contexts or self.refused):
            return
        self.server.audit.record(
            "association",
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            peer=self.peer,
            outcome="refused" if self.refused else "accepted",
            reason=self.refused,
            ended=None if self.refused else self.ended,
            instances=self.instances,
            bytes=self.bytes,
            seconds=round(time.monotonic() - self.started, 3),
            pid=os.getpid(),
        )

    def _refuse(self, reject: tuple[int, int, int], why: str, called: str) -> bool:
        rj = A_ASSOCIATE()
        rj.result, rj.result_source, rj.diagnostic = reject
        out = AssociateRjPDU()
        out.from_primitive(rj)
        self.refused = why
        metrics.ASSOCIATIONS.labels("refused", why).inc()
        log_event(
            log,
            "association_rejected",
            logging.WARNING,
            calling_ae=self.calling_ae,
            called_ae=called,
            peer=self.peer,
            reason=why,
        )
        self.send(out.encode())
        self._await_peer_close()
        return False

    def _await_peer_close(self) -> None:
        """After A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, state Sta13, bounded by the
        ARTIM timer): wait for that, a little, instead of closing first. Closing at once can reach the peer
        before it has read the rejection (pynetdicom then reports an abort, not a rejection)."""
        with contextlib.suppress(OSError):
            self.conn.settimeout(min(ARTIM_SECONDS, self.server.limits.acse_timeout))
            for _ in range(16):  # at most 1 MiB more from a peer that keeps talking
                if not self.conn.recv(1 << 16):
                    return

    def _check_request(self, raw: bytes) -> bool:
        """Refuse (A-ASSOCIATE-RJ) from the request's fixed header alone: protocol version, AE titles, who
        may connect from where, the association limit. True: the request may be decoded and answered."""
        calling, called = ae_title(raw[26:42]), ae_title(raw[10:26])
        self.calling_ae = calling or raw[26:42].decode("ascii", errors="replace").strip(" ")
        called_text = called or raw[10:26].decode("ascii", errors="replace").strip(" ")
        self.called_ae = called_text
        if not int.from_bytes(raw[6:8], "big") & 1:  # PS3.8 9.3.2: bit 0 is version 1, the one we support
            return self._refuse(
                (REJECTED_PERMANENT, SOURCE_ACSE_PROVIDER, REASON_PROTOCOL_VERSION),
                "protocol_version_not_supported",
                called_text,
            )
        if calling is None:
            return self._refuse(
                (REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNISED),
                "calling_ae_invalid",
                called_text,
            )
        if called is None:
            return self._refuse(
                (REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLED_AE_NOT_RECOGNISED),
                "called_ae_invalid",
                called_text,
            )
        refused = self.server.guard.check_association(calling, called, self.peer.rsplit(":", 1)[0])
        if refused is not None:  # AE titles and host allow-list: see access.AccessPolicy
            return self._refuse((refused.result, refused.source, refused.reason), refused.why, called)
        if not self.server.try_associate(self):
            return self._refuse((0x02, 0x03, 0x02), "too_many_associations", called)
        return True

    def _negotiate(self, raw: bytes) -> bool:
        if not self._check_request(raw):
            return False
        cached = self.server.accepted_cache.get(raw)
        if cached is None:  # same request as before (same peer software, same files): same answer
            pdu = AssociateRqPDU()
            try:
                pdu.decode(raw)
                rq = pdu.to_primitive()
            except Exception as exc:  # pynetdicom's decoder raises anything (AssertionError, IndexError...)
                raise ul.ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
            accept_pdu, contexts = pynetdicom_accept(rq, self.server.ae, self.server.limits.max_pdu_size)
            cached = _Accepted(accept_pdu, contexts)
            self.server.remember_accept(raw, cached)
        self.contexts = dict(cached.contexts)
        self.send(cached.accept_pdu)
        metrics.ASSOCIATIONS.labels("accepted", "").inc()
        log_event(
            log,
            "association_accepted",
            logging.DEBUG,
            calling_ae=self.calling_ae,
            peer=self.peer,
            contexts=len(self.contexts),
            pid=os.getpid(),
        )
        return True

    # ---- messages --------------------------------------------------------------------------------------

    def _receive(self, stream: ul.Reader) -> None:
        command = bytearray()
        cmd: dict[int, bytes] | None = None
        cmd_ctx = 0
        sink: IncomingInstance | _Sink | None = None
        limits = self.server.limits
        message_deadline = _NEVER  # the message being received must be whole by then (dimse_timeout)
        header = bytearray(6)
        first, rest = memoryview(header)[:1], memoryview(header)[1:]
        try:
            while True:
                ul.read_exact(stream, first)  # waiting for a PDU: network_timeout of silence (the socket's)
                pdu_deadline = time.monotonic() + limits.network_timeout  # from its first byte to its last
                if pdu_deadline < message_deadline:
                    self.deadline, self.deadline_name = pdu_deadline, "network_timeout"
                else:
                    self.deadline, self.deadline_name = message_deadline, "dimse_timeout"
                ul.read_exact(stream, rest)
                pdu_type, length = ul.parse_pdu_header(header)
                if length > MAX_PDU_ACCEPTED or self.server.guard.pdu_too_large(length):
                    raise ul.ProtocolError(f"PDU of {length} bytes exceeds the announced maximum")
                if length > len(self.buf):
                    self.buf = bytearray(length)
                body = memoryview(self.buf)[:length]
                ul.read_exact(stream, body)
                self.deadline, self.deadline_name = message_deadline, "dimse_timeout"
                if pdu_type == ul.A_RELEASE_RQ:
                    self.ended = "released"
                    self._drop_spare()  # before answering: once released the peer may look at the store
                    self.send(ul.release_rp())
                    return
                if pdu_type == ul.A_ABORT:
                    log_event(
                        log,
                        "association_aborted",
                        logging.WARNING,
                        calling_ae=self.calling_ae,
                        peer=self.peer,
                        reason="peer aborted",
                    )
                    self.ended = "peer aborted"
                    return
                if pdu_type != ul.P_DATA_TF:
                    raise ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                for pdv in ul.iter_pdvs(body):
                    if pdv.context_id not in self.contexts:
                        raise ul.ProtocolError(f"PDV on presentation context {pdv.context_id}, not accepted")
                    if pdv.is_command:
                        if cmd is not None:
                            raise ul.ProtocolError("command fragment while a dataset was expected")
                        if not command:  # a new message
                            message_deadline = time.monotonic() + limits.dimse_timeout
                            if message_deadline < self.deadline:
                                self.deadline = message_deadline
                        command += body[pdv.start : pdv.end]
                        if len(command) > MAX_COMMAND_BYTES:
                            raise ul.ProtocolError(f"command set longer than {MAX_COMMAND_BYTES} bytes")
                        if not pdv.is_last:
                            continue
                        cmd, cmd_ctx = ul.parse_command(bytes(command)), pdv.context_id
                        command.clear()
                        if ul.command_us(cmd, 0x0800) == ul.NO_DATASET:
                            message_deadline = self.deadline = _NEVER
                            self._dispatch(cmd, cmd_ctx, None)
                            cmd = None
                        else:
                            sink = self._sink_for(cmd, cmd_ctx)
                        continue
                    if cmd is None or sink is None:
                        raise ul.ProtocolError("dataset fragment without a command")
                    if pdv.context_id != cmd_ctx:
                        raise ul.ProtocolError(
                            f"dataset on presentation context {pdv.context_id}, its command on {cmd_ctx}"
                        )
                    sink.write(body[pdv.start : pdv.end])
                    if pdv.is_last:
                        done, sink = sink, None
                        message_deadline = self.deadline = _NEVER  # what follows is the node's own work
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
        return IncomingInstance(
            self.server.files,
            self.server.settings,
            command_sop_uid=cmd.get(0x1000, b""),
            command_class_uid=cmd.get(0x0002, b""),
            transfer_syntax=self.contexts[ctx][1],
            calling_ae=self.calling_ae,
            temp=spare,
        )

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
            handling = time.perf_counter()
            status, comment = self._store(data)
            if status == SUCCESS:
                self.instances += 1
                self.bytes += data.size
                metrics.RECEIVED_BYTES.inc(data.size)
        self.send(ul.p_data_command(ctx, ul.encode_response(field, msg_id, status, sop_class, sop, comment)))
        if field == ul.C_STORE_RQ:
            if isinstance(data, IncomingInstance):
                metrics.CSTORE_SECONDS.observe(time.perf_counter() - handling)
            metrics.INSTANCES_RECEIVED.labels(f"0x{status:04X}").inc()
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
            log_event(
                log,
                "instance_rejected",
                logging.WARNING,
                sop_instance_uid=sop_uid[:80],
                status=f"0x{status:04X}",
                reason=outcome,
                calling_ae=self.calling_ae,
            )
            return status, outcome
        if outcome != "stored":
            log_event(log, "instance_" + outcome, sop_instance_uid=sop_uid, calling_ae=self.calling_ae)
        else:
            log_event(log, "instance_stored", logging.DEBUG, sop_instance_uid=sop_uid, calling_ae=self.calling_ae)
        return SUCCESS, ""
