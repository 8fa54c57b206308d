"""Routing rules: which instances are screened, passed or rejected, and where they go.

First match wins; the ``[default]`` rule catches the rest. An instance without Pixel Data (a
structured report, a presentation state) takes the ``pass`` path unless an explicit rule matched
it: there is no image to screen, and holding every SR in quarantine would break workflows.

Matching keys are association facts (``calling_ae``, ``called_ae``, ``peer``) or any DICOM
attribute keyword; values are exact strings, lists of alternatives, or ``{regex = "..."}`` (full
match). A multi-valued attribute matches when any of its values does. The result carries the
reasons, so ``sentinel rules test`` can say why a rule did or did not match.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from gateway.config import ASSOCIATION_KEYS, Config, Rule

NON_IMAGE_PASS = "non-image-pass"


@dataclass(frozen=True)
class Association:
    """Facts about the association an instance arrived on."""

    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""


@dataclass(frozen=True)
class Decision:
    """The rule that applies, the action it gives, and why."""

    rule: Rule
    action: str
    destinations: tuple[str, ...]
    threshold: float | None
    shadow: bool
    reasons: tuple[str, ...]


def _values(ds: Dataset, keyword: str) -> list[str] | None:
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None:
        return [""]
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return [value.decode("latin-1", "replace")]
    return [str(value)]


def _lookup(ds: Dataset | None, assoc: Association, key: str) -> list[str] | None:
    if key in ASSOCIATION_KEYS:
        return [getattr(assoc, key)]
    if ds is None:
        return None
    return _values(ds, key)


def rule_matches(rule: Rule, ds: Dataset | None, assoc: Association) -> tuple[bool, list[str]]:
    """Whether every matcher of ``rule`` holds; with one line per matcher saying why."""
    why: list[str] = []
    for m in rule.matchers:
        values = _lookup(ds, assoc, m.key)
        if values is None:
            why.append(f"{m.describe()}: attribute absent")
            return False, why
        if not any(m.test(v) for v in values):
            shown = values[0] if len(values) == 1 else values
            why.append(f"{m.describe()}: value {shown!r} does not match")
            return False, why
        why.append(f"{m.describe()}: matched")
    return True, why


def has_pixel_data(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def is_image_class(ds: Dataset) -> bool:
    """True when the SOP Class (from the dataset, else the file meta) is an image storage class.

    Why not only ``has_pixel_data``: an image whose dataset was cut short or garbled parses to
    a Dataset without Pixel Data; taken for a non-image it would be passed through unscreened.
    An image class without Pixel Data goes to the detector instead, which refuses it with a
    typed reason (no-pixel-data), so it is quarantined.
    """
    uids: list[str] = []
    with contextlib.suppress(Exception):
        uids.append(str(ds.get("SOPClassUID", "") or ""))
    with contextlib.suppress(Exception):
        uids.append(str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ""))
    return any("Image Storage" in UID(u).name for u in uids if u)


def decide(config: Config, ds: Dataset, assoc: Association) -> Decision:
    """Apply the rules to one instance's header (first match wins)."""
    reasons: list[str] = []
    for rule in config.rules:
        ok, why = rule_matches(rule, ds, assoc)
        if ok:
            reasons.append(f"rule {rule.name!r} matched: " + ("; ".join(why) or "no conditions"))
            return _decision(config, rule, ds, tuple(reasons))
        reasons.append(f"rule {rule.name!r} skipped: {why[-1]}")
    default = config.default
    if not has_pixel_data(ds) and not is_image_class(ds) and default.action != "pass":
        reasons.append("no rule matched and the instance is not an image: pass")
        return Decision(
            rule=default,
            action="pass",
            destinations=default.destinations,
            threshold=None,
            shadow=False,
            reasons=(*reasons, NON_IMAGE_PASS),
        )
    reasons.append("no rule matched: default")
    return _decision(config, default, ds, tuple(reasons))


def _decision(config: Config, rule: Rule, ds: Dataset, reasons: tuple[str, ...]) -> Decision:
    modality = str(ds.get("Modality", "") or "")
    threshold = rule.threshold
    if threshold is None:
        threshold = config.detector.thresholds.get(modality)
    action = rule.action
    extra: tuple[str, ...] = ()
    if action == "screen" and not has_pixel_data(ds):
        extra = ("screen asked but the instance has no Pixel Data: the detector decides",)
    return Decision(
        rule=rule,
        action=action,
        destinations=rule.destinations,
        threshold=threshold,
        shadow=rule.shadow or config.detector.shadow,
        reasons=reasons + extra,
    )


def early_rule(
    config: Config, calling_ae: str, called_ae: str, peer: str, sop_class: str
) -> Rule | None:
    """The rule that certainly applies from association facts and SOP Class alone, else None.

    Used by the SCP to refuse instances a ``reject`` rule covers before acknowledging them.
    A rule that needs any other attribute makes the outcome unknown at this point (None).
    """
    assoc = Association(calling_ae, called_ae, peer)
    early_keys = {*ASSOCIATION_KEYS, "SOPClassUID"}
    for rule in config.rules:
        decidable = all(m.key in early_keys for m in rule.matchers)
        ok = True
        for m in rule.matchers:
            if m.key not in early_keys:
                continue
            value = sop_class if m.key == "SOPClassUID" else getattr(assoc, m.key)
            if not m.test(value):
                ok = False
                break
        if not ok:
            continue
        return rule if decidable else None
    return None


