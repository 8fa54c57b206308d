"""Scoring: preprocess, features + CNN + forest, stacking, verdict.

Stacking as in the paper (rule "stack", the default): ``score = w_cnn * p_cnn +
(1 - w_cnn) * p_rf``, flagged when ``score >= threshold`` (the bundle's operating threshold
unless the caller passes another). Rule "logit" takes the same weighted mean of the parts'
log-odds instead (``fuse``; the shipped bundle's rule since 2026-11-30, see its model card).

A bundle may instead name the rule "max" with a threshold per part (``rule: {"name": "max",
"cnn_threshold": a, "rf_threshold": b}`` in the manifest, written by ``write_bundle(rule=...)``).
Why: with stacking, whenever threshold > 1 - w_cnn an attacker who drives p_cnn to 0 can
never be flagged whatever the forest says (found by the adaptive-attack work). Under "max"
each part is mapped piecewise-linearly so that its own threshold lands on 0.5
(``g(p; t) = 0.5 p / t`` below t, ``0.5 + 0.5 (p - t) / (1 - t)`` above), and ``score =
max(g(p_cnn; a), g(p_rf; b))``: flagged at threshold 0.5 exactly when either part passes its
own threshold (an OR rule), the score stays in [0, 1] and monotone in both parts, and a
caller's threshold still means "flag when score >= threshold".
Any rule may carry a **stride-grid gate** (``"gate": {"feature": "stride_grid_peaks",
"threshold": g, "slope": b}``, bundles since 2026-12-01): the feature (detector.features,
GRID_REASONS) measures periodic spectral peaks that a gradient attack through a strided
network leaves and a natural radiograph does not. It is a third, one-sided expert in log-odds:
``score' = sigmoid(logit(score) + b * max(0, v - g))``. Below g (its 99.9th percentile on the
validation clean images) it changes nothing; above, every tenth of a decade of peak power adds
b/10 to the log-odds. Why a gate and not another forest input: the forest also reads noise
statistics that differ between sources, so a forest given the feature grew unsure of clean
images from an unseen source (NIH: 3.5% flagged, closing note of session 6); the gate's
statistic is a ratio to the image's own spectrum, and its threshold holds across sources.
Any rule may also carry an **either-part override** (``"either": {"cnn": a, "forest": b,
"at": t}``, bundles since issue 15): the instance is also flagged when one part alone passes its
own threshold, ``score'' = max(score', h(p_cnn; a), h(p_rf; b))`` with ``h`` the monotone map
that sends the part's threshold to ``t`` (the bundle's operating threshold). Why: a weighted
fusion averages a confident part away, and attacks against networks the detector never saw
are often seen by one part only (measured: a forest at 0.97 beside a fused 0.86 under the
threshold, issue 15). Each part's threshold is set on the validation clean images of every
source at a small share of the false-positive budget, so flagging stays within it; a caller's
stricter threshold raises the parts' too, since ``h`` is monotone.
A multi-frame instance is scored frame by frame and takes its worst (highest) frame: one
tampered frame is enough to hold the instance.

A ``Detector`` owns one LiteRT interpreter and one feature extractor with scratch buffers,
so it is **not thread-safe**: use one ``Detector`` per worker thread (loading one costs a
few milliseconds plus the bundle verification).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from detector.bundle import (
    Manifest,
    check_runtime_compat,
    forest_columns,
    load_manifest,
    manifest_feature_set,
)
from detector.cnn import LiteRTModel
from detector.errors import BundleError
from detector.features import FEATURE_SET, FEATURE_SET_V3, FEATURE_SETS, FeatureExtractor
from detector.forest import ForestArrays
from detector.preprocess import (
    DEFAULT_MAX_PIXELS,
    INPUT_SIZE,
    image_to_unit,
    iter_input_frames,
    read_dicom,
    resize_frame,
    sniff_format,
)
from detector.resample_lines import line_peak


@dataclass(frozen=True)
class Score:
    """The verdict on one instance and its parts (worst frame), with per-stage timings."""

    score: float
    p_cnn: float
    p_rf: float
    threshold: float
    flagged: bool
    frames: int
    worst_frame: int
    bundle_id: str
    timings_ms: dict[str, float]
    frame_scores: tuple[float, ...] = field(default=())
    grid_peaks: float | None = None  # the gate's feature (worst frame), None without a gate
    # the resampling-line score (highest frame) and the site's gate for it; None when the site
    # has no line gate (detector.resample_lines): flagged is then the score's verdict alone
    line_peak: float | None = None
    line_gate: float | None = None
    # the detector CNN's highest probability over the frames, and the site's CNN gate for it
    # (``apply_cnn_gate``); cnn_gate is None when the site has none
    cnn_peak: float | None = None
    cnn_gate: float | None = None
    # the site's line ramp (``apply_line_ramp``); None when the site has none
    line_ramp: float | None = None

    @property
    def line_flagged(self) -> bool:
        return (self.line_gate is not None and self.line_peak is not None
                and self.line_peak >= self.line_gate)

    def as_dict(self) -> dict[str, object]:
        """Plain-JSON form for audit records, sidecars and ``sentinel score --json``."""
        return {
            "score": self.score,
            "p_cnn": self.p_cnn,
            "p_rf": self.p_rf,
            "threshold": self.threshold,
            "flagged": self.flagged,
            "frames": self.frames,
            "worst_frame": self.worst_frame,
            "bundle_id": self.bundle_id,
            "timings_ms": dict(self.timings_ms),
            "frame_scores": list(self.frame_scores),
            "grid_peaks": self.grid_peaks,
            "line_peak": self.line_peak,
            "line_gate": self.line_gate,
            "cnn_peak": self.cnn_peak,
            "cnn_gate": self.cnn_gate,
            "line_ramp": self.line_ramp,
        }


def apply_cnn_gate(score: Score, gate: float | None) -> Score:
    """The verdict with a site's CNN gate: also flagged when the detector CNN alone reaches
    ``gate`` on any frame (``[detector] cnn_gate``, proposed by ``sentinel calibrate
    --cnn-gate`` on the site's own clean images).

    Why (issue 19): an attacker who holds the public bundle crafts perturbations that keep every
    forest feature at clean values and fool the public CNN; a site bundle trained from a secret
    has CNN weights the attacker lacks, and its CNN alone still sees most of those attacks
    (measured: 81-85% of the strongest public-bundle attack, with the gate set for 1% on the
    site's clean images). The fused score cannot use that: at the bundle's threshold the
    forest's clean-looking vote outweighs it, and at the site's fused 1% point the forest's
    source-specific noise statistics flag most images of any other source (71-94% of NIH),
    where the gate flags 4.5-5.7%. Applied outside the scoring process, on the score it
    returns, so one verdict rule serves ``sentinel serve``, the plugin and the CLI.
    """
    if gate is None:
        return score
    if score.cnn_peak is None:
        raise ValueError("this score carries no CNN peak: score it with this version")
    flagged = score.flagged or score.cnn_peak >= gate
    return replace(score, cnn_gate=float(gate), flagged=flagged)


# log-odds the site's line ramp adds per e-fold of the resampling-line score above its floor:
# about +1 per 4% of line, so the ramp spans clean-looking to flagged within about a fifth of
# the floor (measured with 10, 25 and 50 on the NIH site: the same cells gain, within 5 points)
LINE_RAMP_SLOPE = 25.0


def ramp_flags(score: Any, line: Any, threshold: float, ramp: float) -> Any:
    """Whether the line ramp flags (floats or arrays): ``logit(score) + LINE_RAMP_SLOPE *
    ln(line / ramp)`` reaches ``logit(threshold)``, for a line above ``ramp``."""
    raised = apply_gate(score, np.log(np.maximum(np.asarray(line, np.float64), 1e-12)),
                        float(np.log(ramp)), LINE_RAMP_SLOPE)
    out = (np.asarray(line, np.float64) > ramp) & (np.asarray(raised) >= threshold)
    return bool(out) if out.ndim == 0 else out


def apply_line_ramp(score: Score, ramp: float | None) -> Score:
    """The verdict with a site's line ramp: also flagged when the score, raised in log-odds by
    how far the resampling-line score lies above ``ramp`` (``LINE_RAMP_SLOPE`` per e-fold),
    reaches the threshold (``[detector] line_ramp``, proposed by ``sentinel calibrate`` below
    the line gate).

    Why (issue 15): the line gate flags on the line alone, so it must sit above every clean
    image's line (2.3-2.5 on NIH), and attacks that blur the period (DI-FGSM, an L2 attack, a
    12-bit attack at eps 0.003) leave lines of 1.9-2.4 that it misses. Those images' scores
    are raised too, if not to the threshold: two weak signs together are a strong one, and the
    site's clean images rarely carry both. Measured on NIH (300 site images, ramp placed where
    it flags none of them, 660 others): +2 to +7 points on a fifth to a third of the zoo's
    attack cells (DI-FGSM, L2, 12-bit eps 0.003), none lost, no more of the 660 flagged
    (README, "The line ramp"). Needs the line score: the site's line gate measures it.
    """
    if ramp is None:
        return score
    if score.line_peak is None:
        raise ValueError("the line ramp needs the resampling-line score: score with a line gate")
    flagged = score.flagged or ramp_flags(score.score, score.line_peak, score.threshold, ramp)
    return replace(score, line_ramp=float(ramp), flagged=bool(flagged))


FUSIONS = ("stack", "logit")  # the weighted fusions a bundle can name; "max" is the OR rule
_LOGIT_CLIP = 1e-6


def fuse(p_cnn: Any, p_rf: Any, w_cnn: float, fusion: str = "stack") -> Any:
    """The weighted fusion of the parts' probabilities, for floats or numpy arrays alike.

    "stack": the paper's ``w p_cnn + (1 - w) p_rf``. "logit": the same weights on the parts'
    log-odds, mapped back to a probability, ``sigmoid(w logit(p_cnn) + (1 - w) logit(p_rf))``
    (logarithmic opinion pooling). Why log-odds: a mean of probabilities squeezes the confident
    tail, so a forest at 0.95 (a clean image from a noisier source) and at 0.9999 (salt and
    pepper) count almost alike; in log-odds they are 3 and 9, and a low CNN can outvote the first
    but not the second.
    """
    if fusion == "stack":
        return w_cnn * p_cnn + (1.0 - w_cnn) * p_rf
    if fusion != "logit":
        raise ValueError(f"unknown fusion {fusion!r}; use one of {FUSIONS}")
    a = np.clip(np.asarray(p_cnn, np.float64), _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    b = np.clip(np.asarray(p_rf, np.float64), _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    z = w_cnn * np.log(a / (1.0 - a)) + (1.0 - w_cnn) * np.log(b / (1.0 - b))
    out = 1.0 / (1.0 + np.exp(-z))
    return float(out) if out.ndim == 0 else out


GATE_FEATURE = "stride_grid_peaks"


def apply_gate(score: Any, grid: Any, threshold: float, slope: float) -> Any:
    """``sigmoid(logit(score) + slope * max(0, grid - threshold))`` for floats or arrays: the
    score unchanged below the gate's threshold, raised in log-odds above it."""
    bonus = slope * np.maximum(0.0, np.asarray(grid, np.float64) - threshold)
    s = np.clip(np.asarray(score, np.float64), _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    raised = 1.0 / (1.0 + np.exp(-(np.log(s / (1.0 - s)) + bonus)))
    out = np.where(bonus > 0.0, raised, np.asarray(score, np.float64))
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Rule:
    """How the two parts become one score: "stack" (weighted mean of probabilities), "logit"
    (weighted mean of log-odds) or "max" (per-part OR); then the optional stride-grid gate."""

    name: str = "stack"
    cnn_threshold: float = 0.5
    rf_threshold: float = 0.5
    gate_threshold: float | None = None  # None: no gate
    gate_slope: float = 0.0
    either: Either | None = None  # None: no either-part override

    def combine(self, p_cnn: float, p_rf: float, w_cnn: float,
                grid: float | None = None) -> float:
        if self.name in FUSIONS:
            score = float(fuse(p_cnn, p_rf, w_cnn, self.name))
        else:
            score = max(_to_half(p_cnn, self.cnn_threshold), _to_half(p_rf, self.rf_threshold))
        if self.gate_threshold is not None:
            if grid is None:
                raise ValueError("this rule has a stride-grid gate: pass the grid feature")
            score = float(apply_gate(score, grid, self.gate_threshold, self.gate_slope))
        return float(apply_either(score, p_cnn, p_rf, self.either))

    @property
    def fusion(self) -> str:
        """The weighted fusion (for offline evaluation); "max" bundles have none."""
        return self.name if self.name in FUSIONS else "stack"


@dataclass(frozen=True)
class Either:
    """The either-part override: each part's own threshold (None: that part has none) and
    the operating threshold it is mapped onto."""

    cnn: float | None
    forest: float | None
    at: float

    def manifest_entry(self) -> dict[str, float | None]:
        return {"cnn": self.cnn, "forest": self.forest, "at": self.at}


def apply_either(score: Any, p_cnn: Any, p_rf: Any, either: Either | None) -> Any:
    """``max(score, h(p_cnn; a), h(p_rf; b))`` for floats or arrays (``h`` sends a part's
    threshold to ``either.at``); the score unchanged without an override."""
    if either is None:
        return score
    out = np.asarray(score, np.float64)
    for p, t in ((p_cnn, either.cnn), (p_rf, either.forest)):
        if t is not None:
            p = np.asarray(p, np.float64)
            mapped = np.where(p < t, either.at * p / t,
                              either.at + (1.0 - either.at) * (p - t) / (1.0 - t))
            out = np.maximum(out, mapped)
    return float(out) if out.ndim == 0 else out


def _to_half(p: float, t: float) -> float:
    """Monotone map of [0, 1] onto [0, 1] that sends t to 0.5."""
    return 0.5 * p / t if p < t else 0.5 + 0.5 * (p - t) / (1.0 - t)


def parse_rule(raw: object, bundle_dir: Path) -> Rule:
    """The manifest's optional "rule" entry; absent means the paper's stacking."""
    if raw is None:
        return Rule()
    where = f"model bundle file {bundle_dir / 'manifest.json'}"
    if not isinstance(raw, dict) or raw.get("name") not in (*FUSIONS, "max"):
        raise BundleError(
            f'{where}: rule must be {{"name": "stack"}}, {{"name": "logit"}} or {{"name": '
            f'"max", "cnn_threshold": a, "rf_threshold": b}}, got {raw!r}; re-export'
        )
    gate: dict[str, Any] = {**_parse_gate(raw.get("gate"), where),
                            **_parse_either(raw.get("either"), where)}
    if raw["name"] in FUSIONS:
        return Rule(str(raw["name"]), **gate)
    try:
        a, b = float(raw["cnn_threshold"]), float(raw["rf_threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{where}: rule 'max' needs numeric cnn_threshold and rf_threshold; re-export"
        ) from exc
    if not (0.0 < a < 1.0 and 0.0 < b < 1.0):
        raise BundleError(f"{where}: rule 'max' part thresholds must lie in (0, 1), got {a}, {b}")
    return Rule("max", a, b, **gate)


def _parse_gate(raw: object, where: str) -> dict[str, float]:
    """Rule keyword arguments of an optional "gate" entry (empty when there is none)."""
    if raw is None:
        return {}
    try:
        if not isinstance(raw, dict) or raw.get("feature") != GATE_FEATURE:
            raise ValueError("unknown gate")
        g, b = float(raw["threshold"]), float(raw["slope"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f'{where}: rule "gate" must be {{"feature": "{GATE_FEATURE}", "threshold": g, '
            f'"slope": b}}, got {raw!r}; re-export the bundle'
        ) from exc
    if not (np.isfinite(g) and np.isfinite(b) and b > 0.0):
        raise BundleError(f"{where}: gate threshold must be finite and slope > 0, got {g}, {b}")
    return {"gate_threshold": g, "gate_slope": b}


def _parse_either(raw: object, where: str) -> dict[str, Either]:
    """Rule keyword arguments of an optional "either" entry (empty when there is none)."""
    if raw is None:
        return {}
    try:
        if not isinstance(raw, dict) or not set(raw) <= {"cnn", "forest", "at"}:
            raise ValueError("unknown keys")
        parts = {k: None if raw.get(k) is None else float(raw[k]) for k in ("cnn", "forest")}
        at = float(raw["at"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f'{where}: rule "either" must be {{"cnn": a, "forest": b, "at": t}} (a or b may be '
            f"null), got {raw!r}; re-export the bundle"
        ) from exc
    if not all(v is None or 0.0 < v < 1.0 for v in parts.values()) or not 0.0 < at < 1.0:
        raise BundleError(f"{where}: rule \"either\" thresholds must lie in (0, 1), got {raw!r}")
    if parts["cnn"] is None and parts["forest"] is None:
        return {}  # an override with no part is none
    return {"either": Either(parts["cnn"], parts["forest"], at)}


def extracted_feature_set(manifest: Manifest, rule: Rule) -> str:
    """The feature set the runtime extracts for a bundle: its forest's, or v3 (v1 and
    stride_grid_peaks) when a stride-grid gate needs that feature and the forest reads v1.
    The forest reads the first columns of it."""
    feature_set = manifest_feature_set(manifest)
    if rule.gate_threshold is None or GATE_FEATURE in FEATURE_SETS[feature_set]:
        return feature_set
    if feature_set != FEATURE_SET:
        raise BundleError(
            f"model bundle {manifest.bundle_dir}: a stride-grid gate needs feature set "
            f"{FEATURE_SET} or {FEATURE_SET_V3}, not {feature_set}; re-export"
        )
    return FEATURE_SET_V3


class Detector:
    """A loaded, verified bundle ready to score images. Not thread-safe: one per thread."""

    def __init__(
        self,
        manifest: Manifest,
        cnn: LiteRTModel,
        forest: ForestArrays,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.manifest = manifest
        self.bundle_id = manifest.bundle_id
        self.threshold = manifest.threshold
        self.w_cnn = manifest.w_cnn
        self.rule = parse_rule(manifest.extra.get("rule"), manifest.bundle_dir)
        self.max_pixels = max_pixels
        self.cnn = cnn
        self.forest = forest
        feature_set = extracted_feature_set(manifest, self.rule)
        self._grid_at = (FEATURE_SETS[feature_set].index(GATE_FEATURE)
                         if self.rule.gate_threshold is not None else None)
        self._features = FeatureExtractor((INPUT_SIZE, INPUT_SIZE), feature_set=feature_set)
        # the forest reads the first columns of the extracted vector, or (a secret site bundle,
        # train.secret) the drawn subset of its own set's features in the drawn order
        cols = forest_columns(manifest.feature_names, manifest_feature_set(manifest))
        self._forest_cols = None if cols is None else np.asarray(cols, np.int64)

    def forest_input(self, feats: np.ndarray) -> np.ndarray:
        """(1, n) forest input from one extracted feature vector."""
        if self._forest_cols is None:
            return feats[None, : self.forest.n_features]
        return feats[None, self._forest_cols]

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike[str] | None = None,
        num_threads: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Detector:
        """Verify a bundle (None = the default bundle) and load its CNN and forest."""
        manifest = load_manifest(bundle_dir)
        check_runtime_compat(manifest)
        forest_path = manifest.path_of("forest")
        try:
            forest = ForestArrays.load(forest_path)
        except ValueError as exc:
            raise BundleError(
                f"model bundle file {forest_path}: {exc}; re-export the bundle"
            ) from exc
        if forest.n_features != len(manifest.feature_names):
            raise BundleError(
                f"model bundle file {forest_path}: forest takes {forest.n_features} features, "
                f"manifest lists {len(manifest.feature_names)}; re-export the bundle"
            )
        cnn = LiteRTModel(manifest.path_of("cnn"), num_threads=num_threads)
        return cls(manifest, cnn, forest, max_pixels=max_pixels)

    def warm_up(self) -> float:
        """Run every stage once on synthetic input; returns the seconds it took.

        The first call of a fresh Detector pays one-off costs (LiteRT's first invoke, FFT
        plans, pydicom's lazy import of its pixel handlers); a gateway worker calls this at
        start so the first real instance is not the slow one.
        """
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        t0 = time.perf_counter()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.Rows, ds.Columns = 300, 260
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ramp = (np.arange(300 * 260, dtype=np.uint16) % 4096).reshape(300, 260)
        ds.PixelData = ramp.tobytes()
        self.score_dataset(ds)
        return time.perf_counter() - t0

    def score_unit(self, img224: np.ndarray) -> tuple[float, float, float]:
        """(p_cnn, p_rf, score) of one 224x224 image in [0, 1]."""
        p_cnn, p_rf, score, _, _ = self._score_timed(img224)
        return p_cnn, p_rf, score

    def _score_timed(self, img: np.ndarray
                     ) -> tuple[float, float, float, float | None, tuple[float, ...]]:
        """(p_cnn, p_rf, score, grid feature or None, stage seconds) of one image."""
        t0 = time.perf_counter()
        feats = self._features.extract(img)
        t1 = time.perf_counter()
        p_cnn = float(self.cnn.predict(img))
        t2 = time.perf_counter()
        p_rf = float(self.forest.predict_proba(self.forest_input(feats))[0])
        t3 = time.perf_counter()
        grid = None if self._grid_at is None else float(feats[self._grid_at])
        score = self.rule.combine(p_cnn, p_rf, self.w_cnn, grid)
        return p_cnn, p_rf, score, grid, (t1 - t0, t2 - t1, t3 - t2)

    def score_frames(
        self,
        frames: list[np.ndarray] | np.ndarray,
        threshold: float | None = None,
        decode_s: float = 0.0,
        line_peaks: list[float] | None = None,
        line_gate: float | None = None,
    ) -> Score:
        """Score already-resized (224, 224) frames; the instance takes its worst frame.

        With ``line_gate``, ``line_peaks`` (one per frame, at the native matrix) flag the
        instance too when the highest reaches it (detector.resample_lines)."""
        thr = self.threshold if threshold is None else float(threshold)
        t_start = time.perf_counter()
        parts: list[tuple[float, float, float]] = []
        grids: list[float | None] = []
        spent = np.zeros(3)
        for img in frames:
            p_cnn, p_rf, score, grid, times = self._score_timed(img)
            parts.append((p_cnn, p_rf, score))
            grids.append(grid)
            spent += times
        if not parts:
            raise ValueError("no frames to score")
        scores = tuple(p[2] for p in parts)
        worst = int(np.argmax(scores))
        p_cnn, p_rf, score = parts[worst]
        line = gate = None
        if line_gate is not None and line_peaks:
            line, gate = float(max(line_peaks)), float(line_gate)
        total = decode_s + (time.perf_counter() - t_start)
        return Score(
            score=score,
            p_cnn=p_cnn,
            p_rf=p_rf,
            threshold=thr,
            flagged=bool(score >= thr) or (line is not None and gate is not None
                                           and line >= gate),
            frames=len(parts),
            worst_frame=worst,
            bundle_id=self.bundle_id,
            timings_ms={
                "decode": decode_s * 1e3,
                "features": float(spent[0]) * 1e3,
                "cnn": float(spent[1]) * 1e3,
                "forest": float(spent[2]) * 1e3,
                "total": total * 1e3,
            },
            frame_scores=scores,
            grid_peaks=grids[worst],
            line_peak=line,
            line_gate=gate,
            cnn_peak=float(max(p[0] for p in parts)),
        )

    def score_dataset(self, ds: Dataset, threshold: float | None = None,
                      line_gate: float | None = None) -> Score:
        """Decode, normalise and resize each frame of a dataset, then score it."""
        return self._score_ds(ds, threshold, time.perf_counter(), line_gate)

    def _score_ds(self, ds: Dataset, threshold: float | None, t0: float,
                  line_gate: float | None = None) -> Score:
        """Score a dataset; decode time is counted from ``t0`` (before the header parse)."""
        peaks: list[float] = []

        def native(frame: np.ndarray, bits_stored: int) -> None:
            peaks.append(line_peak(frame, float((1 << bits_stored) - 1)))

        frames = list(iter_input_frames(ds, max_pixels=self.max_pixels,
                                        native=native if line_gate is not None else None))
        return self.score_frames(frames, threshold, decode_s=time.perf_counter() - t0,
                                 line_peaks=peaks, line_gate=line_gate)

    def score_path(self, path: str | os.PathLike[str], threshold: float | None = None,
                   line_gate: float | None = None) -> Score:
        """Score a DICOM or PNG/JPEG file (detected by content)."""
        path = Path(path)
        t0 = time.perf_counter()
        if sniff_format(path) == "dicom":
            ds = read_dicom(path, max_pixels=self.max_pixels)
            return self._score_ds(ds, threshold, t0, line_gate)
        unit = image_to_unit(path, max_pixels=self.max_pixels)
        peaks = [line_peak(f, 1.0) for f in unit] if line_gate is not None else []
        frames = [np.clip(resize_frame(f).astype(np.float32), 0.0, 1.0) for f in unit]
        return self.score_frames(frames, threshold, decode_s=time.perf_counter() - t0,
                                 line_peaks=peaks, line_gate=line_gate)
