"""What the listener lets in: who may associate from where, over what transport, with how much data.

- ``AccessPolicy`` decides an A-ASSOCIATE-RQ from (calling AE, called AE, peer address) and names the
  A-ASSOCIATE-RJ to answer. Host allow-lists take IP addresses and CIDR blocks only: a DNS name would
  let whoever controls reverse DNS choose who is allowed.
- ``build_tls_context`` makes a server context per PS3.15 BCP 195 (TLS 1.2 or newer, AEAD ciphers with
  forward secrecy, no compression or renegotiation), with optional client-certificate verification.
- ``ListenerGuard`` bundles them with the transport limits the receive path (server.py) applies: a cap
  on open connections, the TLS handshake under a timeout in the connection's thread, and a bound on the
  PDU length a peer may announce, checked before anything is allocated for it.
- ``ae_title`` reads an AE title from its 16 bytes as the standard defines it: only spaces are insignificant,
  and a title with control characters, a backslash or nothing but spaces is no title.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from dicom_node.config import ANY_AE, Config, ConfigError, SecuritySection, resolve_path
from dicom_node.logs import log_event

log = logging.getLogger("dicom_node.listener")

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07
SOURCE_ACSE_PROVIDER = 0x02
REASON_PROTOCOL_VERSION = 0x02

# BCP 195 (RFC 7525/9325) recommended TLS 1.2 suites; TLS 1.3 suites are all AEAD with forward secrecy.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send, and why (for the log, never for the peer)."""

    result: int
    source: int
    reason: int
    why: str


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def ae_title(raw: bytes) -> str | None:
    """The AE title in a 16-byte field, or None if it is not one: the default character repertoire without
    backslash or control characters (PS3.5 table 6.2-1), not all spaces; leading and trailing spaces removed."""
    if any(b < 0x20 or b > 0x7E or b == 0x5C for b in raw):
        return None
    title = raw.decode("ascii").strip(" ")
    return title or None


def parse_network(value: str) -> Network:
    """An IP address or CIDR block; raises ValueError for anything else (host names included)."""
    return ipaddress.ip_network(value.strip(), strict=False)


def _address(host: str) -> Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return addr


class AccessPolicy:
    """Decides an association request from the calling AE title, the called AE title and the peer's address.

    Refusals (all rejected-permanent, source DICOM UL service-user):
    calling AE title not in ``allowed_calling_ae_titles`` -> reason 3 (calling AE title not recognised);
    called AE title not ours (when ``require_called_ae_title``) -> reason 7 (called AE title not recognised);
    calling AE title known but connecting from a host outside its ``allowed_hosts`` -> reason 3 as well: a
    DICOM application entity is its title *and* its address, so the pair is what is not recognised, and the
    peer learns nothing it could not learn by trying another title.
    """

    def __init__(self, node_ae_title: str, security: SecuritySection) -> None:
        self.node_ae_title = node_ae_title.strip(" ")
        self.require_called = security.require_called_ae_title
        self.allowed_titles = frozenset(t.strip(" ") for t in security.allowed_calling_ae_titles)
        self.hosts: dict[str, tuple[Network, ...]] = {
            ae.strip(" "): tuple(parse_network(h) for h in hosts) for ae, hosts in security.allowed_hosts.items()
        }

    @classmethod
    def from_config(cls, cfg: Config) -> AccessPolicy:
        return cls(cfg.node.ae_title, cfg.security)

    def hosts_for(self, calling_ae: str) -> tuple[Network, ...] | None:
        """The networks ``calling_ae`` may connect from, or None when any host will do."""
        return self.hosts.get(calling_ae, self.hosts.get(ANY_AE))

    def check(self, calling_ae: str, called_ae: str, host: str) -> Rejection | None:
        calling, called = calling_ae.strip(" "), called_ae.strip(" ")
        if self.allowed_titles and calling not in self.allowed_titles:
            return Rejection(
                REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNISED, "calling_ae_not_allowed"
            )
        if self.require_called and called != self.node_ae_title:
            return Rejection(
                REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLED_AE_NOT_RECOGNISED, "called_ae_not_recognised"
            )
        networks = self.hosts_for(calling)
        if networks is not None:
            addr = _address(host)
            if addr is None or not any(addr in n for n in networks if n.version == addr.version):
                return Rejection(
                    REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNISED, "host_not_allowed"
                )
        return None


def build_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The listener's TLS context (BCP 195), or None when ``security.tls_cert_file`` is unset."""
    s = cfg.security
    if not s.tls_cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[s.tls_min_version]
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    cert, key = resolve_path(cfg.base_dir, s.tls_cert_file), resolve_path(cfg.base_dir, s.tls_key_file)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"security.tls_cert_file/tls_key_file: cannot load {cert} with {key}: {exc}") from exc
    if s.tls_ca_file:
        ca = resolve_path(cfg.base_dir, s.tls_ca_file)
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"security.tls_ca_file: cannot load {ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if s.tls_require_client_cert else ssl.CERT_OPTIONAL
    return ctx


@dataclass(frozen=True)
class ListenerGuard:
    """The checks the receive path runs: per connection, per association request and per PDU."""

    policy: AccessPolicy
    tls: ssl.SSLContext | None
    handshake_timeout: float  # seconds for the TLS handshake (the ACSE timeout)
    max_negotiating: int  # connections not yet associated; beyond it the oldest is cut (see ReceiveServer)
    max_pdu_body: int  # largest PDU length field accepted after negotiation

    @classmethod
    def from_config(cls, cfg: Config) -> ListenerGuard:
        n = cfg.node
        key = resolve_path(cfg.base_dir, cfg.security.tls_key_file) if cfg.security.tls_key_file else None
        if key is not None and key.stat().st_mode & 0o077:
            log_event(log, "tls_key_readable_by_others", logging.WARNING, path=str(key))
        return cls(
            policy=AccessPolicy.from_config(cfg),
            tls=build_tls_context(cfg),
            handshake_timeout=n.acse_timeout,
            max_negotiating=connection_cap(n.max_associations),
            max_pdu_body=pdu_body_limit(n.max_pdu_size),
        )

    def admit(self, negotiating: int, peer: tuple[str, int]) -> bool:
        """Whether one more connection may negotiate; logs the refusal."""
        if negotiating < self.max_negotiating:
            return True
        log_event(
            log,
            "connection_refused",
            logging.WARNING,
            peer=_addr(peer),
            reason="too_many_connections",
            limit=self.max_negotiating,
        )
        return False

    def wrap(self, conn: socket.socket) -> socket.socket:
        """The socket to serve: TLS-wrapped without I/O (the handshake happens in ``handshake``)."""
        if self.tls is None:
            return conn
        return self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)

    def handshake(self, conn: socket.socket, peer: tuple[str, int]) -> bool:
        """Complete the TLS handshake within the timeout, in the connection's own thread (never the accept
        loop, where one silent client would stop the listener). False: close the connection."""
        if not isinstance(conn, ssl.SSLSocket):
            return True
        conn.settimeout(self.handshake_timeout)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # plain DICOM on the TLS port, an untrusted certificate, silence
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log_event(log, "tls_handshake_failed", logging.WARNING, peer=_addr(peer), reason=reason)
            return False
        log_event(
            log, "tls_established", logging.DEBUG, peer=_addr(peer), version=conn.version(), client=_subject(conn)
        )
        return True

    def check_association(self, calling_ae: str, called_ae: str, host: str) -> Rejection | None:
        return self.policy.check(calling_ae, called_ae, host)

    def pdu_too_large(self, length: int) -> bool:
        return length > self.max_pdu_body


def connection_cap(max_associations: int) -> int:
    """Connections allowed to negotiate at once (accepted associations are counted apart): room for the excess
    to be answered A-ASSOCIATE-RJ (transient, local limit exceeded) rather than dropped, yet a bound on the
    threads and sockets a connection flood can hold, each for at most acse_timeout."""
    return 2 * max_associations + 4


def pdu_body_limit(max_pdu_size: int) -> int:
    """P-DATA may not exceed the maximum length the node announced (PS3.8 D.1); a little slack for peers that
    count the PDV headers differently, never more."""
    return max(max_pdu_size, 16384) + 4096


def _addr(peer: Any) -> str:
    try:
        return f"{peer[0]}:{peer[1]}"
    except (TypeError, IndexError):
        return str(peer)


def _subject(sock: ssl.SSLSocket) -> str | None:
    cert = sock.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        # typeshed gives every key of the certificate dict one value type; a subject's RDNs hold (name, value)
        for k, v in rdn:  # type: ignore[str-unpack]
            if k == "commonName":
                return str(v)
    return None
