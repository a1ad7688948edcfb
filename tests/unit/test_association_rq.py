"""The direct A-ASSOCIATE-RQ path answers exactly as pynetdicom does, or leaves the request to it."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context

from dicom_node.config import parse_config
from dicom_node.receive.incoming import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION
from dicom_node.receive.listener import build_ae
from dicom_node.receive.negotiation import accept, parse
from dicom_node.receive.server import pynetdicom_accept, supported_syntaxes
from tests.peers import DCMTK_ENV, STORESCU

AE_ = build_ae(parse_config({}, Path(".")))
SUPPORTED = supported_syntaxes(AE_)
MAX_PDU = 262144
ABSTRACT = [
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.1.1",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.3.4.5.6",
]  # the last: not a storage class
TRANSFER = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.1.99",
    "1.2.3.99",
]


def _request(
    contexts: list[tuple[str, list[str]]],
    *,
    calling: str = "STORESCU",
    called: str = "DICOM_NODE",
    extra: list[object] | None = None,
    version: bool = True,
) -> bytes:
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title, rq.called_ae_title = calling, called
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    rq.presentation_context_definition_list = cxs
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.7"
    items: list[object] = [max_len, impl]
    if version:
        name = ImplementationVersionNameNotification()
        name.implementation_version_name = "OFFIS_DCMTK_367"
        items.append(name)
    rq.user_information = items + (extra or [])
    pdu = AssociateRqPDU()
    pdu.from_primitive(rq)
    return pdu.encode()


def _pynetdicom(raw: bytes) -> tuple[bytes, dict[int, tuple[str, str]]]:
    pdu = AssociateRqPDU()
    pdu.decode(raw)
    return pynetdicom_accept(pdu.to_primitive(), AE_, MAX_PDU)


def _direct(raw: bytes) -> tuple[bytes, dict[int, tuple[str, str]]] | None:
    rq = parse(raw)
    if rq is None:
        return None
    return accept(
        rq,
        SUPPORTED,
        max_pdu=MAX_PDU,
        implementation_uid=IMPLEMENTATION_UID,
        implementation_version=IMPLEMENTATION_VERSION,
    )


def _role(abstract: str) -> SCP_SCU_RoleSelectionNegotiation:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = abstract, True, True
    return role


contexts_st = st.lists(
    st.tuples(st.sampled_from(ABSTRACT), st.lists(st.sampled_from(TRANSFER), min_size=1, max_size=5, unique=True)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contexts=contexts_st, roles=st.booleans(), version=st.booleans())
def test_plain_requests_get_pynetdicoms_answer_byte_for_byte(
    contexts: list[tuple[str, list[str]]], roles: bool, version: bool
) -> None:
    extra: list[object] = [_role(contexts[0][0])] if roles else []
    raw = _request(contexts, extra=extra, version=version)
    direct = _direct(raw)
    assert direct is not None, "a plain request must take the direct path"
    assert direct == _pynetdicom(raw)


def test_dcmtk_storescus_own_request_gets_pynetdicoms_answer(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)  # storescu never connecting fails the test below instead of hanging it
    got: list[bytes] = []

    def capture() -> None:
        conn, _ = server.accept()
        with conn:
            head = conn.recv(6, socket.MSG_WAITALL)
            body = conn.recv(int.from_bytes(head[2:], "big"), socket.MSG_WAITALL)
            got.append(head + body)

    t = threading.Thread(target=capture, daemon=True)
    t.start()
    empty = tmp_path / "x.dcm"
    empty.write_bytes(b"")
    subprocess.run(
        [
            STORESCU,
            "-aec",
            "DICOM_NODE",
            "-to",
            "5",
            "-ta",
            "5",
            "+sd",
            "127.0.0.1",
            str(server.getsockname()[1]),
            str(tmp_path),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=60,
    )
    t.join(30)
    server.close()
    [raw] = got
    direct = _direct(raw)
    assert direct is not None
    answer, contexts = direct
    assert (answer, contexts) == _pynetdicom(raw)
    assert len(contexts) > 100  # storescu proposes every storage class it knows


def test_anything_beyond_the_plain_case_is_left_to_pynetdicom() -> None:
    ct = [(ABSTRACT[0], [TRANSFER[0]])]
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.primary_field = 1, b"alice"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 2
    raw = _request(ct)
    assert parse(raw) is not None
    backslash = raw[:10] + b"A\\B".ljust(16) + raw[26:]
    for odd in (
        _request(ct, extra=[identity]),
        _request(ct, extra=[window]),
        _request(ct, calling=" LEADING"),
        backslash,
    ):
        assert parse(odd) is None
    for broken in (raw[:-3], raw[:6] + b"\0\2" + raw[8:], b"\x02" + raw[1:], raw[:2] + b"\0\0\0\1" + raw[6:]):
        assert parse(broken) is None
