"""Routing rules: which instances are screened, passed or rejected, and where they go.

First match wins; the ``[default]`` rule catches the rest. Matching keys are association facts
(``calling_ae``, ``called_ae``, ``peer``) or any DICOM attribute keyword; values are exact
strings, lists of alternatives, or ``{regex = "..."}`` (full match). A multi-valued attribute
matches when any of its values does. The result carries the reasons, so ``sentinel rules test``
can say why a rule did or did not match.

What a rule may decide, and from what. Whoever can tamper with the pixels can also write every
header attribute: Modality (``OT``, lower-case ``cr``), BodyPartExamined, SOPClassUID, any tag.
So screening is decided by the presence of pixel data, never by those fields (DESIGN.md):

* ``pass`` forwards an instance unscreened only when it carries no pixels: no Pixel Data (nor
  Float / Double Float Pixel Data), a SOP class without pixels (SR, KO, PR...) named alike by
  the negotiated presentation context, the file meta and the dataset, and a dataset parsed to
  its last byte (a parse that stops early may have missed pixel data another reader finds). Any
  other instance that a ``pass`` rule or a ``pass`` default takes is screened instead, and the
  decision says why (``Decision.override``, audited with the ``received`` event). An image SOP
  class without pixel data is screened too: the detector quarantines it (no-pixel-data).
* The one way to forward pixels unscreened is ``allow_unscreened_pixels = true`` on a ``pass``
  rule keyed only on association facts, which the gateway checks itself (allowed callers,
  addresses, TLS): a named sender, not a label. The loader refuses it anywhere else, and
  ``sentinel check`` warns about each one.
* A rule that tests header fields may make screening stricter, never weaker. Its threshold, and
  the per-Modality ``[detector.thresholds]``, apply only below the sender's *baseline* threshold:
  that of the rule association facts alone select (the first matching rule keyed only on them,
  else ``[default]``), else the bundle's. Its ``shadow`` applies only when that baseline is
  shadow too. Relabelling an image therefore never buys a more lenient threshold or shadow mode
  than an unlabelled image from the same sender gets. It can shed the extra scrutiny a
  header-keyed rule adds, so such a rule guards against honest mistakes, not against a tamperer;
  ``sentinel check`` says so.
* ``reject`` works as written (dodging it by relabelling gains nothing: the instance is then
  screened like any other).
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from gateway.config import ASSOCIATION_KEYS, Config, Rule

NON_IMAGE_PASS = "non-image-pass"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Storage SOP classes that carry pixel data without "Image" in their name (PS3.4 B.5).
_PIXEL_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.8",  # Standalone Overlay (retired)
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map (float pixels)
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation
    "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic OCT B-scan Volume Analysis
    "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map
    "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
})
_DEFER = 64 * 1024  # values this large are skipped, not read, by the parse-to-end check
_MAX_INFLATED = 64 << 20  # a deflated pass candidate larger than this is screened instead


@dataclass(frozen=True)
class Association:
    """Facts about the association an instance arrived on."""

    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""


@dataclass(frozen=True)
class Decision:
    """The rule that applies, the action it gives, and why.

    ``threshold`` None means the bundle's own. ``at_most_bundle``: the threshold came from a
    header the sender writes, so it may only tighten the bundle's (``threshold_for``).
    ``override``: why the action differs from what the rule says (pass refused, or pixels
    forwarded unscreened); fixed text without dataset values, written to the audit log.
    """

    rule: Rule
    action: str
    destinations: tuple[str, ...]
    threshold: float | None
    shadow: bool
    reasons: tuple[str, ...]
    at_most_bundle: bool = False
    override: str = ""

    def threshold_for(self, bundle_threshold: float | None) -> float | None:
        """The threshold to score with, given the loaded bundle's own."""
        if self.threshold is None or not self.at_most_bundle or bundle_threshold is None:
            return self.threshold
        return min(self.threshold, float(bundle_threshold))


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
    return any(k in ds for k in PIXEL_KEYWORDS)


def is_pixel_class(uid: str) -> bool:
    """True for a storage SOP class whose instances carry pixel data (every "... Image Storage"
    class and the few others listed above)."""
    return uid in _PIXEL_CLASSES or "Image" in UID(uid).name


def parsed_to_end(path: Path | str) -> bool:
    """Whether the dataset in ``path`` parses to its last byte.

    Why: pydicom stops silently at a top-level delimiter or a garbled header and returns what it
    read so far; a PACS or viewer that parses on could find Pixel Data after that point. Large
    values are skipped, not read; a deflated dataset is inflated up to ``_MAX_INFLATED``.
    """
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            with open(path, "rb") as fh:
                pydicom.filereader.read_preamble(fh, False)
                pydicom.filereader._read_file_meta_info(fh)
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(fh.read(_MAX_INFLATED + 1), _MAX_INFLATED)
                if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
                    return False
            buf = io.BytesIO(data)
            pydicom.filereader.read_dataset(buf, False, True, defer_size=_DEFER)
            return buf.tell() == len(data)
        with open(path, "rb") as fh:
            pydicom.dcmread(fh, defer_size=_DEFER)
            return fh.tell() == os.fstat(fh.fileno()).st_size
    except Exception:  # unreadable here: not provably free of pixels
        return False


@dataclass(frozen=True)
class Content:
    """What an instance carries, as far as ``pass`` is concerned: the SOP class each source names
    and whether there is pixel data, visible or possibly out of the parser's reach."""

    pixel_elements: tuple[str, ...]
    classes: Mapping[str, str] = field(default_factory=dict)  # source -> SOP Class UID
    parsed_to_end: bool | None = None  # None: not checked (no file, or already not pixel-free)

    @property
    def pixel_classes(self) -> tuple[str, ...]:
        return tuple(src for src, uid in self.classes.items() if is_pixel_class(uid))

    @property
    def classes_disagree(self) -> bool:
        return len(set(self.classes.values())) > 1 or "dataset" not in self.classes

    @property
    def pixel_free(self) -> bool:
        return (not self.pixel_elements and not self.pixel_classes
                and not self.classes_disagree and self.parsed_to_end is not False)

    def why_not_pixel_free(self) -> str:
        """The first reason the instance may carry pixels (fixed text: no dataset values)."""
        if self.pixel_elements:
            return f"the instance carries {self.pixel_elements[0]}"
        if self.pixel_classes:
            src = self.pixel_classes[0]
            return f"its SOP class ({src}) is an image class {self.classes[src]}"
        if "dataset" not in self.classes:
            return "the dataset names no SOP class"
        if self.classes_disagree:
            shown = ", ".join(f"{s} {u}" for s, u in self.classes.items())
            return f"the SOP classes disagree ({shown})"
        if self.parsed_to_end is False:
            return "the dataset does not parse to its end (pixel data may lie beyond)"
        return "it carries no pixels"


def inspect_content(ds: Dataset, sop_class: str = "", path: Path | str | None = None) -> Content:
    """The pixel facts of one instance. ``sop_class``: the SOP class of the presentation context
    it arrived on ("" when unknown: then the file meta's, which a sender proposes from)."""
    classes: dict[str, str] = {}
    if sop_class:
        classes["negotiated"] = sop_class.strip()
    with contextlib.suppress(Exception):
        meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
        if meta_class:
            classes["file meta"] = meta_class
    with contextlib.suppress(Exception):
        ds_class = str(ds.get("SOPClassUID", "") or "").strip()
        if ds_class:
            classes["dataset"] = ds_class
    content = Content(pixel_elements=tuple(k for k in PIXEL_KEYWORDS if k in ds),
                      classes=classes)
    if not content.pixel_free:
        return content  # no need to read the file again
    source = path if path is not None else getattr(ds, "filename", None)
    if not isinstance(source, str | os.PathLike):
        return content  # an in-memory dataset: nothing beyond what was parsed
    return Content(content.pixel_elements, classes, parsed_to_end(source))


def association_rule(config: Config, assoc: Association) -> Rule:
    """The rule association facts alone select: the first matching rule keyed only on them, else
    the default. Whatever a sender writes into its headers, it cannot get past this rule."""
    for rule in config.rules:
        if not rule.header_keys and rule_matches(rule, None, assoc)[0]:
            return rule
    return config.default


def decide(config: Config, ds: Dataset, assoc: Association, sop_class: str = "",
           path: Path | str | None = None) -> Decision:
    """Apply the rules to one instance (first match wins), then the pixel-data policy above.

    ``sop_class``: the SOP class of the negotiated presentation context; ``path``: the file the
    dataset was read from (default ``ds.filename``), read again only for a pass candidate.
    """
    reasons: list[str] = []
    matched: Rule | None = None
    for rule in config.rules:
        ok, why = rule_matches(rule, ds, assoc)
        if ok:
            reasons.append(f"rule {rule.name!r} matched: " + ("; ".join(why) or "no conditions"))
            matched = rule
            break
        reasons.append(f"rule {rule.name!r} skipped: {why[-1]}")
    rule = matched if matched is not None else config.default
    if matched is None:
        reasons.append("no rule matched: default")
    if matched is not None and rule.action == "reject":
        return _plain(rule, "reject", tuple(reasons))
    content = inspect_content(ds, sop_class, path)
    if matched is None and content.pixel_free and rule.action != "pass":
        reasons.append("the instance carries no pixels: pass")
        return _plain(rule, "pass", (*reasons, NON_IMAGE_PASS))
    if rule.action == "reject":
        return _plain(rule, "reject", tuple(reasons))
    if rule.action == "pass":
        if content.pixel_free:
            return _plain(rule, "pass", (*reasons, "the instance carries no pixels: pass"))
        why = content.why_not_pixel_free()
        if rule.allow_unscreened_pixels:
            note = (f"{why}, forwarded UNSCREENED: rule {rule.name!r} sets "
                    "allow_unscreened_pixels for this sender")
            return _plain(rule, "pass", (*reasons, note), override=note)
        override = (f"rule {rule.name!r} says pass, but {why}: screened instead (pass is only "
                    "for SOP classes without pixels)")
        return _screened(config, rule, ds, assoc, (*reasons, override), override)
    extra = () if content.pixel_elements else (
        "screen asked but the instance has no Pixel Data: the detector decides",)
    return _screened(config, rule, ds, assoc, (*reasons, *extra), "")


def _plain(rule: Rule, action: str, reasons: tuple[str, ...], override: str = "") -> Decision:
    return Decision(rule=rule, action=action, destinations=rule.destinations, threshold=None,
                    shadow=False, reasons=reasons, override=override)


def modality_threshold(config: Config, ds: Dataset) -> tuple[str, float] | None:
    """The ``[detector.thresholds]`` entry for the instance's Modality (case and padding
    ignored: a lower-case ``cr`` gets CR's), or None."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    for key, value in config.detector.thresholds.items():
        if key.strip().upper() == modality and modality:
            return key, value
    return None


def _screened(config: Config, rule: Rule, ds: Dataset, assoc: Association,
              reasons: tuple[str, ...], override: str) -> Decision:
    """A screen decision whose threshold and shadow mode header fields can only tighten."""
    base = association_rule(config, assoc)
    base_threshold = base.threshold if base.action != "reject" else None  # None: the bundle's
    notes: list[str] = []
    threshold, at_most_bundle = base_threshold, False
    if rule is base and rule.threshold is not None:
        threshold = rule.threshold  # chosen by association facts alone: applies as it is
    else:
        # chosen by headers the sender writes (a header-keyed rule, the Modality table): it
        # applies only below the baseline; None stands for the bundle's own threshold
        own, source = rule.threshold, f"rule {rule.name!r}"
        if own is None:
            entry = modality_threshold(config, ds)
            if entry is not None:
                own, source = entry[1], f"[detector.thresholds] {entry[0]}"
        if own is None and rule is not base and base_threshold is not None:
            at_most_bundle = True
            notes.append(f"threshold: the bundle's, or {base_threshold:g} (that of rule "
                         f"{base.name!r}) if lower: header fields only tighten")
        elif own is not None and base_threshold is None:
            threshold, at_most_bundle = own, True
            notes.append(f"threshold {own:g} from {source}, or the bundle's if lower: it "
                         "depends on a header the sender writes, so it can only tighten")
        elif own is not None and base_threshold is not None:
            threshold = min(own, base_threshold)
            if own > base_threshold:
                notes.append(f"threshold {own:g} from {source} capped at {base_threshold:g}, "
                             f"that of rule {base.name!r} (header fields only tighten)")
    shadow = rule.shadow
    if shadow and rule is not base and not base.shadow:
        shadow = False
        notes.append(f"shadow of rule {rule.name!r} not applied: it depends on header fields "
                     f"and rule {base.name!r}, which association facts select, is not shadow")
    return Decision(
        rule=rule,
        action="screen",
        destinations=rule.destinations,
        threshold=threshold,
        shadow=shadow or config.detector.shadow,
        reasons=(*reasons, *notes),
        at_most_bundle=at_most_bundle,
        override=override,
    )


def config_warnings(config: Config, bundle_threshold: float | None = None) -> list[tuple[str, ...]]:
    """What ``sentinel check`` warns about: rules whose intent depends on headers the sender
    writes. Each warning is (what, what it means, how to fix)."""
    out: list[tuple[str, ...]] = []
    assoc_keys = ", ".join(ASSOCIATION_KEYS)
    for r in config.rules:
        if r.allow_unscreened_pixels:
            who = "; ".join(m.describe() for m in r.matchers)
            out.append((
                f"rule {r.name!r} sets allow_unscreened_pixels: images from {who} are forwarded "
                "WITHOUT SCREENING",
                "anyone able to write pixels on that path (the device itself, its network, an "
                "archive that relays for it) reaches the PACS unchecked; it is audited as such",
                "remove allow_unscreened_pixels unless that sender is outside the threat model; "
                "pin it by peer address and TLS (require_client_cert) if it stays",
            ))
        fields = [k for k in r.header_keys if k != "SOPClassUID"]
        if r.action == "pass" and fields:
            out.append((
                f"rule {r.name!r} passes instances by {', '.join(fields)}, which the sender "
                "writes: an image relabelled to match would skip screening",
                "pass is applied only to instances without pixels (SR, KO, PR...); an instance "
                "with pixel data that this rule matches is screened instead (audited)",
                "match SR/KO/PR by SOPClassUID, or leave them to the default (they pass anyway); "
                f"to exempt a trusted sender's images, key a rule on {assoc_keys} and set "
                "allow_unscreened_pixels = true",
            ))
        if r.action == "screen" and r.shadow and r.header_keys and not config.detector.shadow:
            out.append((
                f"rule {r.name!r} sets shadow but matches on {', '.join(r.header_keys)}, which "
                "the sender writes: a relabelled image would be forwarded whatever its score",
                "its shadow applies only where the rule association facts select is shadow too",
                f"set shadow on [default] or on a rule keyed on {assoc_keys}",
            ))
    if config.default.action == "pass":
        selectors = sorted({k for r in config.rules if r.action == "screen"
                            for k in r.header_keys})
        how = (f"; rules choose what to screen by {', '.join(selectors)}, which the sender "
               "writes (an image relabelled Modality = OT, or lower-case cr, reaches the "
               "default)") if selectors else ""
        out.append((
            f"[default] action = \"pass\"{how}",
            "every instance with pixel data is screened whatever its header says; the default's "
            "pass applies only to SOP classes without pixels (SR, KO, PR...), which also pass "
            "under action = \"screen\"",
            "set [default] action = \"screen\" (the same outcome, stated); to exempt a trusted "
            f"sender's images, key a rule on {assoc_keys} with allow_unscreened_pixels = true",
        ))
    loose = _loose_thresholds(config, bundle_threshold)
    if config.detector.thresholds or loose:
        base = ("[default] threshold" if config.default.threshold is not None
                else "the bundle's threshold")
        shown = ", ".join(f"{k} = {v:g}" for k, v in config.detector.thresholds.items())
        what = (f"[detector.thresholds] ({shown}) is keyed on Modality, which the sender writes"
                if shown else "rule thresholds depend on header fields the sender writes")
        ignored = f"; no effect here: {', '.join(loose)}" if loose else ""
        out.append((
            what,
            "a relabelled image would pick the most lenient, so a threshold chosen by a header "
            f"only tightens: it applies where it is below the sender's baseline ({base}, or that "
            f"of a rule keyed only on {assoc_keys}){ignored}. Relabelling can shed a tighter "
            "one, so it guards against honest mistakes, not against a tamperer",
            f"to loosen for a noisy source, set threshold on a rule keyed on {assoc_keys} (or "
            "[default] threshold for every sender)",
        ))
    return out


def _loose_thresholds(config: Config, bundle_threshold: float | None) -> list[str]:
    """Header-chosen thresholds above the default baseline: they can never apply."""
    base = config.default.threshold if config.default.threshold is not None else bundle_threshold
    if base is None:
        return []
    found = [f"[detector.thresholds] {k} = {v:g} > {base:g}"
             for k, v in config.detector.thresholds.items() if v > base]
    found += [f"rule {r.name!r} threshold {r.threshold:g} > {base:g}" for r in config.rules
              if r.header_keys and r.threshold is not None and r.threshold > base]
    return found


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
