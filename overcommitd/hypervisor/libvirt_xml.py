"""What overcommitd reads from and writes into a libvirt domain's XML.

From ``<devices><memballoon>``: the balloon's features (``autodeflate`` is QEMU's
``deflate-on-oom``, ``freePageReporting`` its ``free-page-reporting``) and the stats
polling period (``<stats period='N'/>``). libvirt has no attribute for QEMU's
``free-page-hint`` (which also needs an ``iothread``), so an operator sets it in the
QEMU namespace: ``<qemu:override>`` on the balloon's alias (libvirt >= 8.2) or a
``-global``/``-set`` on ``<qemu:commandline>``; both are read. From our own namespace in ``<metadata>``: the
SLA floor, weight and exclusion. The floor lives there because libvirt's QEMU driver
rejects ``<memtune><min_guarantee>`` ("Parameter 'min_guarantee' not supported by QEMU").
Pure: strings in, frozen dataclasses out.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from overcommitd.model import BalloonFeatures

NAMESPACE = "https://overcommitd.dev/xmlns/guest/1"
PREFIX = "oc"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
_QEMU_TRUE = ("on", "true", "yes")  # QEMU's spellings of a true bool property
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
            free_page_hint=_free_page_hint(root, balloon),
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


def _free_page_hint(root: ET.Element, balloon: ET.Element) -> bool:
    """Whether the domain's QEMU-namespace XML turns on the balloon's ``free-page-hint``."""
    q = f"{{{QEMU_NAMESPACE}}}"
    alias_el = balloon.find("alias")
    alias = alias_el.get("name", "balloon0") if alias_el is not None else "balloon0"  # libvirt's default
    for device in root.iterfind(f"./{q}override/{q}device"):
        if device.get("alias") == alias:
            for prop in device.iterfind(f"./{q}frontend/{q}property"):
                if prop.get("name") == "free-page-hint":
                    return (prop.get("value") or "").lower() in _QEMU_TRUE
    args = [arg.get("value") or "" for arg in root.iterfind(f"./{q}commandline/{q}arg")]
    for option, value in itertools.pairwise(args):
        target, _, setting = value.partition("=")
        owner, _, name = target.rpartition(".")
        ours = owner.startswith("virtio-balloon") if option == "-global" else owner == f"device.{alias}"
        if option in ("-global", "-set") and name == "free-page-hint" and ours:
            return setting.lower() in _QEMU_TRUE
    return False


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
