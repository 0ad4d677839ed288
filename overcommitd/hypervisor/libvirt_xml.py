"""What overcommitd reads from and writes into a libvirt domain's XML.

From ``<devices><memballoon>``: the balloon's features (``autodeflate`` is QEMU's
``deflate-on-oom``, ``freePageReporting`` its ``free-page-reporting``) and the stats
polling period (``<stats period='N'/>``). From our own namespace in ``<metadata>``: the
SLA floor, weight and exclusion. The floor lives there because libvirt's QEMU driver
rejects ``<memtune><min_guarantee>`` ("Parameter 'min_guarantee' not supported by QEMU").
Pure: strings in, frozen dataclasses out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from overcommitd.model import BalloonFeatures

NAMESPACE = "https://overcommitd.dev/xmlns/guest/1"
PREFIX = "oc"
_UNIT_KIB = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "k": 1,
    "kib": 1,
    "kb": 1000 / 1024,
    "m": 1024,
    "mib": 1024,
    "mb": 1000**2 / 1024,
    "g": 1024**2,
    "gib": 1024**2,
    "gb": 1000**3 / 1024,
}


class DomainXmlError(ValueError):
    """The domain XML or our metadata in it is malformed."""


@dataclass(frozen=True, slots=True)
class GuestMetadata:
    """Our per-guest settings kept in the domain's ``<metadata>``."""

    floor_kib: int = 0
    weight: float = 1.0
    exclude: bool = False


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """Everything overcommitd takes from a domain's XML."""

    has_balloon: bool
    features: BalloonFeatures
    stats_period_s: float
    metadata: GuestMetadata


def _kib(el: ET.Element, where: str) -> int:
    unit = (el.get("unit") or "KiB").lower()
    if unit not in _UNIT_KIB:
        raise DomainXmlError(f"{where}: unknown unit {el.get('unit')!r}")
    try:
        return int(float((el.text or "").strip()) * _UNIT_KIB[unit])
    except ValueError as e:
        raise DomainXmlError(f"{where}: {el.text!r} is not a number") from e


def parse_metadata(guest: ET.Element | None, where: str) -> GuestMetadata:
    """Our ``<oc:guest>`` element (children ``floor`` with a ``unit``, ``weight``, ``exclude``)."""
    if guest is None:
        return GuestMetadata()
    ns = f"{{{NAMESPACE}}}"
    floor_el, weight_el, exclude_el = guest.find(ns + "floor"), guest.find(ns + "weight"), guest.find(ns + "exclude")
    floor = _kib(floor_el, f"{where}: metadata floor") if floor_el is not None else 0
    weight = 1.0
    if weight_el is not None:
        try:
            weight = float((weight_el.text or "").strip())
        except ValueError as e:
            raise DomainXmlError(f"{where}: metadata weight {weight_el.text!r} is not a number") from e
        if weight <= 0:
            raise DomainXmlError(f"{where}: metadata weight(={weight}) must be > 0")
    exclude = exclude_el is not None and (exclude_el.text or "").strip().lower() in ("yes", "true", "1")
    if floor < 0:
        raise DomainXmlError(f"{where}: metadata floor(={floor}) must be >= 0")
    return GuestMetadata(floor, weight, exclude)


def parse_domain(xml: str, *, where: str = "domain") -> DomainConfig:
    """The balloon and our metadata from ``dom.XMLDesc()``."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXmlError(f"{where}: domain XML does not parse: {e}") from e
    balloon = root.find("./devices/memballoon")
    has_balloon = balloon is not None and balloon.get("model", "virtio") != "none"
    features = BalloonFeatures()
    period_s = 0.0
    if balloon is not None and has_balloon:
        features = BalloonFeatures(
            stats_vq=True,
            deflate_on_oom=balloon.get("autodeflate") == "on",
            reporting=balloon.get("freePageReporting") == "on",
        )
        stats = balloon.find("stats")
        if stats is not None:
            try:
                period_s = float(stats.get("period", "0"))
            except ValueError as e:
                raise DomainXmlError(f"{where}: memballoon stats period {stats.get('period')!r}") from e
    meta = parse_metadata(root.find(f"./metadata/{{{NAMESPACE}}}guest"), where)
    return DomainConfig(has_balloon, features, period_s, meta)


def metadata_element(meta: GuestMetadata) -> str:
    """The element to hand ``dom.setMetadata(VIR_DOMAIN_METADATA_ELEMENT, xml, PREFIX,
    NAMESPACE)``; libvirt adds the namespace to it."""
    guest = ET.Element("guest")
    ET.SubElement(guest, "floor", unit="KiB").text = str(meta.floor_kib)
    ET.SubElement(guest, "weight").text = repr(meta.weight)
    ET.SubElement(guest, "exclude").text = "yes" if meta.exclude else "no"
    return ET.tostring(guest, encoding="unicode")


def parse_metadata_element(xml: str, where: str) -> GuestMetadata:
    """The inverse of :func:`metadata_element`, for ``dom.metadata(ELEMENT, NAMESPACE)``,
    which returns the element without its namespace."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXmlError(f"{where}: our metadata does not parse: {e}") from e
    # Re-home the un-namespaced children so one parser serves both forms.
    for el in root.iter():
        if not el.tag.startswith("{"):
            el.tag = f"{{{NAMESPACE}}}{el.tag}"
    return parse_metadata(root, where)
