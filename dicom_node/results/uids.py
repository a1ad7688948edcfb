"""Deterministic UIDs for result objects.

A re-run or a re-send of the same job must produce the same Series/SOP Instance UIDs so the PACS keeps
one copy (DESIGN §5). UIDs are "2.25.<int>" (ISO/IEC 9834-8 UUID-derived form) built from the first
128 bits of a SHA-256 over the parts, so they fit DICOM's 64-character limit (at most 44 characters).
"""

from __future__ import annotations

import hashlib
import json

_ROOT = "2.25."


def derive_uid(*parts: str) -> str:
    """Return a valid DICOM UID that depends only on ``parts`` (order and boundaries included)."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    # JSON keeps part boundaries unambiguous: ("a", "bc") and ("ab", "c") hash differently.
    payload = json.dumps(["dicom-node-uid-v1", *parts], ensure_ascii=False).encode("utf-8")
    digest = hashlib.sha256(payload).digest()
    return _ROOT + str(int.from_bytes(digest[:16], "big"))
