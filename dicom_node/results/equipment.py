"""Who made a result: the node as equipment, the model as algorithm (IHE AI Results identification)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Required, TypedDict

import highdicom as hd
from pydicom.sr.codedict import codes

from ai_models.types import ModelIdentity

_LO_MAX = 64  # DICOM LO value length
HASH_PREFIX_LEN = 12


@dataclass(frozen=True, kw_only=True)
class NodeIdentity:
    """The node as DICOM equipment: Manufacturer, model, SoftwareVersions, DeviceSerialNumber, and the site
    it runs at (``results.institution_name``; empty: left out, it is Type 3)."""

    manufacturer: str = "dicom-node"
    model_name: str = "dicom-node"
    software_version: str
    device_serial_number: str
    institution_name: str = ""


def algorithm_version(identity: ModelIdentity) -> str:
    """Model version plus bundle hash prefix, so two bundles with the same version stay distinguishable."""
    suffix = f" sha256:{identity.bundle_hash[:HASH_PREFIX_LEN]}" if identity.bundle_hash else ""
    return identity.version[: _LO_MAX - len(suffix)] + suffix


def algorithm_name(identity: ModelIdentity) -> str:
    return identity.name[:_LO_MAX]


def seg_algorithm_identification(identity: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence for SEG segments (family: Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(identity),
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version(identity),
    )


def sr_algorithm_identification(
    identity: ModelIdentity, node: NodeIdentity, parameters: list[str] | None = None
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for SR measurement groups and measurements."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm_name(identity),
        version=algorithm_version(identity),
        parameters=parameters or None,
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=node.manufacturer[:_LO_MAX],
    )


class EquipmentKeywords(TypedDict, total=False):
    """General Equipment module attributes, as highdicom's constructors name them."""

    manufacturer: Required[str]
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str


def equipment_kwargs(node: NodeIdentity) -> EquipmentKeywords:
    """General Equipment module attributes as highdicom constructor keywords."""
    kwargs: EquipmentKeywords = {
        "manufacturer": node.manufacturer[:_LO_MAX],
        "manufacturer_model_name": node.model_name[:_LO_MAX],
        "software_versions": node.software_version[:_LO_MAX],
        "device_serial_number": node.device_serial_number[:_LO_MAX],
    }
    if node.institution_name:
        kwargs["institution_name"] = node.institution_name[:_LO_MAX]
    return kwargs
