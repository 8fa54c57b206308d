"""Write an attacked copy of a DICOM file, as an attacker on the wire would (red-teaming).

The perturbation is computed where the threat model puts it (the victim's 224x224 input in
[0, 1]) and mapped back with the same function the training pipeline uses
(``train.attacks.to_native``: by default the native delta whose area average is exactly the
crafted one, so the victim reads back the image the attack made; rounding to the BitsStored
grid), then written back as stored values of the same bit depth,
sign and photometric interpretation (MONOCHROME1 inverted back) in the same transfer syntax.
Everything else in the header is kept; the SOP Instance UID is new unless ``keep_uid``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train import attacks

# transfer syntaxes we can write back losslessly with pydicom + pylibjpeg plugins
_REENCODE_PLUGIN = {
    "1.2.840.10008.1.2.5": "pydicom",  # RLE Lossless (pydicom's own encoder)
    "1.2.840.10008.1.2.4.90": "pylibjpeg",  # JPEG 2000 Lossless (pylibjpeg-openjpeg)
    "1.2.840.10008.1.2.4.201": "pylibjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
}


class AttackWriteError(RuntimeError):
    """The attacked copy cannot be written faithfully (names the file, reason and fix)."""


@dataclass(frozen=True)
class AttackResult:
    out_path: Path
    method: str
    param: float
    sop_instance_uid: str
    transfer_syntax: str
    victim_logit_before: float  # native attacks: the margin for the victim's own prediction
    victim_logit_after: float
    max_stored_change: int
    changed_pixel_share: float


def _unit_params(ds: Any) -> tuple[int, bool, bool]:
    from detector import preprocess

    return preprocess._unit_params(ds, str(getattr(ds, "filename", "dataset")))


def unit_to_stored(unit: np.ndarray, *, bits_stored: int, signed: bool,
                   invert: bool) -> np.ndarray:
    """Inverse of detector.preprocess.stored_to_unit on the BitsStored grid (int64)."""
    lo = -(1 << (bits_stored - 1)) if signed else 0
    hi = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
    u = 1.0 - unit.astype(np.float64) if invert else unit.astype(np.float64)
    return lo + np.round(np.clip(u, 0.0, 1.0) * (hi - lo)).astype(np.int64)


def bundle_carrying(bundle_dir: Path | None, needs: dict[str, str]) -> tuple[Path, Any]:
    """(runtime bundle directory, its verified training files) where the training bundle
    (train.training_bundle) carries every entry of ``needs`` (manifest entry -> what it is);
    else a FileNotFoundError naming what is missing and where it was looked for."""
    from detector import bundle as bundle_mod
    from train import training_bundle

    bdir = Path(bundle_dir) if bundle_dir else bundle_mod.DEFAULT_BUNDLE
    return bdir, training_bundle.load_training(bdir, tuple(needs))


def load_victim_from_bundle(bundle_dir: Path | None) -> Any:
    """The victim of a runtime bundle (entry 'victim' of its training bundle), digest-verified."""
    from train import victim

    _, files = bundle_carrying(bundle_dir, {"victim": "victim classifier"})
    return victim.load_victim(files.path_of("victim"))


# (x224 (1, 224, 224), label (1,), levels) -> adversarial (1, 224, 224): an attack that needs
# more than the victim (the adaptive ones, which hold the detector too)
Adversary = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def perturb_unit_frame(unit: np.ndarray, levels: int, method: str, param: float,
                       model: Any, seed: int, upsample: str = attacks.DEFAULT_UPSAMPLING,
                       adversary: Adversary | None = None,
                       ) -> tuple[np.ndarray, float, float]:
    """Perturb one native unit frame at 224 and map it back; returns (native', logit, logit')."""
    from detector import preprocess
    from train import victim

    x224 = preprocess.resize_to_input(unit[None].astype(np.float32))
    logit = float(victim.predict_logits(model, x224)[0]) if model is not None else float("nan")
    label = np.array([1.0 if logit > 0 else 0.0], np.float32)  # the victim's own prediction
    if adversary is not None:
        adv = adversary(x224, label, levels)
    else:
        p = attacks.Perturbation(f"{method}_{param}", method, param)
        fn = attacks.make_gradient_attack(model) if p.needs_victim else None
        adv = attacks.perturb224(p, x224, labels=label, attack=fn,
                                 rng=np.random.default_rng(seed))
    native = attacks.to_native(unit.astype(np.float32), adv[0] - x224[0], levels, upsample)
    after = preprocess.resize_to_input(native[None])
    logit_after = (float(victim.predict_logits(model, after)[0]) if model is not None
                   else float("nan"))
    return native, logit, logit_after


def attack_dicom(in_path: Path, out_path: Path, *, method: str, param: float,
                 model: Any = None, keep_uid: bool = False, seed: int = 0,
                 upsample: str = attacks.DEFAULT_UPSAMPLING,
                 adversary: Adversary | None = None) -> AttackResult:
    """``adversary`` (see ``adaptive_adversary``) crafts the 224 image instead of ``method``."""
    if adversary is None and method not in attacks.METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {attacks.METHODS}")
    if (adversary is not None or method in ("pgd", "fgsm")) and model is None:
        raise ValueError(f"{method} needs the victim classifier (from the bundle)")

    def attack_frame(unit: np.ndarray, levels: int, f: int) -> tuple[np.ndarray, float, float]:
        return perturb_unit_frame(unit, levels, method, param, model, seed + f, upsample,
                                  adversary)

    return _attack_frames(in_path, out_path, attack_frame, keep_uid=keep_uid, method=method,
                          param=param)


def _attack_frames(in_path: Path | str, out_path: Path | str,
                   attack_frame: Callable[[np.ndarray, int, int], tuple[np.ndarray, float, float]],
                   *, keep_uid: bool, method: str, param: float) -> AttackResult:
    """Read a DICOM's frames as unit arrays, attack each with ``attack_frame(unit, levels,
    frame index) -> (attacked unit, victim margin before, after)``, and write the copy back
    on the BitsStored grid: the one frame loop of every attacked copy."""
    from detector import preprocess

    ds = preprocess.read_dicom(in_path)
    _check_writable(ds, in_path)
    bits_stored, signed, invert = _unit_params(ds)
    levels = (1 << bits_stored) - 1
    stored = ds.pixel_array
    frames = stored[None] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else stored
    units = preprocess.dataset_to_unit(ds)
    out_frames = np.empty(frames.shape, frames.dtype)
    before, after = [], []
    for f in range(len(units)):
        native, lb, la = attack_frame(units[f], levels, f)
        new = unit_to_stored(native, bits_stored=bits_stored, signed=signed, invert=invert)
        # keep any bits above BitsStored as they were (overlays in old files)
        high = frames[f].astype(np.int64) & ~((1 << bits_stored) - 1) if not signed else 0
        out_frames[f] = (new | high if not signed else new).astype(frames.dtype)
        before.append(lb)
        after.append(la)
    return _write_copy(ds, Path(in_path), Path(out_path), out_frames, stored, keep_uid=keep_uid,
                       method=method, param=param, before=before, after=after)


def _write_copy(ds: Any, in_path: Path, out_path: Path, out_frames: np.ndarray,
                stored: np.ndarray, *, keep_uid: bool, method: str, param: float,
                before: list[float], after: list[float]) -> AttackResult:
    """Write ``out_frames`` (stored values) into ``ds`` in its own transfer syntax and save it:
    the one writer of every attacked copy (Table II, adaptive and native attacks alike)."""
    import pydicom
    from pydicom.uid import generate_uid

    ts = ds.file_meta.TransferSyntaxUID
    original_uid = str(ds.SOPInstanceUID)
    arr = out_frames[0] if len(out_frames) == 1 else out_frames
    if ts.is_encapsulated:
        plugin = _REENCODE_PLUGIN[str(ts)]
        try:
            ds.compress(ts, arr, encoding_plugin=plugin, generate_instance_uid=False)
        except Exception as exc:
            raise AttackWriteError(
                f"{in_path}: cannot re-encode {ts.name} with {plugin} ({exc}); install the "
                f"encoder (`pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle` or pyjpegls) "
                "or decompress the input first (`dcmdjpeg IN OUT`)"
            ) from exc
    else:
        ds.PixelData = arr.tobytes()
    uid = original_uid if keep_uid else generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed into place once read back: a crash or a full disk
    # never leaves a half-written copy that a resumed folder run would take as done
    part = out_path.with_name(f".{out_path.name}.part")
    try:
        ds.save_as(part, enforce_file_format=True)
        check = pydicom.dcmread(part)
        diff = check.pixel_array.astype(np.int64) - stored.astype(np.int64)
        os.replace(part, out_path)
    finally:
        part.unlink(missing_ok=True)
    return AttackResult(
        out_path=out_path, method=method, param=param, sop_instance_uid=uid,
        transfer_syntax=str(ts), victim_logit_before=float(np.mean(before)),
        victim_logit_after=float(np.mean(after)),
        max_stored_change=int(np.abs(diff).max()),
        changed_pixel_share=float(np.mean(diff != 0)),
    )


def adaptive_adversary(method: str, eps: float, *, bundle_dir: Path | None, data_dir: Path,
                       n_fit: int = 200, steps: int = 60, seed: int = 0,
                       det_weight: float | None = None,
                       log: Callable[[str], None] = print) -> tuple[Adversary, Any]:
    """An adaptive attack of ``train.adaptive`` (it knows the detector) for ``attack_dicom``.

    What the attacker fits besides the bundle's weights (the HFC Gaussians of the victim's
    features, each feature's clean spread, the forest surrogate) comes from ``n_fit`` clean
    images of ``data_dir`` (labels from its labels.csv, else the victim's own predictions),
    as in ``python -m train.adaptive``; ``det_weight`` weighs the detector terms against the
    victim term as its ``--det-weight`` does (None: AttackSettings' default); returns
    (adversary, victim).
    """
    import tempfile

    from detector import features
    from train import adaptive, datasets, victim

    if method not in adaptive.ATTACKS:
        raise ValueError(f"unknown adaptive attack {method!r}: use one of "
                         f"{tuple(adaptive.ATTACKS)}")
    spec = adaptive.ATTACKS[method]
    # the Keras twin of the detector CNN is what the white-box attacks differentiate through
    bdir, files = bundle_carrying(bundle_dir, {"victim": "victim classifier",
                                               "cnn_keras": "Keras twin of its CNN"})
    vic = victim.load_victim(files.path_of("victim"))
    recs, _ = datasets.drop_duplicates(datasets.scan_folder(Path(data_dir)))
    if len(recs) < 10:
        raise ValueError(f"{data_dir}: {len(recs)} images; the attacker's statistics need at "
                         "least 10 clean images (e.g. ../shared/data/kermany224)")
    pick = np.random.default_rng(seed).permutation(len(recs))[:n_fit]
    log(f"fitting the attacker's statistics on {len(pick)} clean images of {data_dir}")
    x_fit, y_fit, levels = datasets.load_split_arrays(Path(data_dir), [recs[i] for i in pick])
    own = (victim.predict_logits(vic, x_fit) > 0).astype(np.int64)
    y_fit = np.where(y_fit < 0, own, y_fit)
    pgd = attacks.gradient_attack(attacks.make_gradient_attack(vic), x_fit,
                                  y_fit.astype(np.float32), "pgd", eps)
    fs = adaptive.attacker_feature_set(bdir)
    f_clean = features.extract_batch(x_fit, fs)
    f_pert = features.extract_batch(attacks.quantise(pgd, int(levels[0]) if levels else 255), fs)
    with tempfile.TemporaryDirectory(prefix="sentinel-attack-") as cache:
        models = adaptive.load_models(bdir, x_fit, y_fit, f_clean, f_pert, Path(cache),
                                      seed=seed)
    if spec.w_surrogate > 0 and models.surrogate is None:
        raise ValueError(f"{method} needs a surrogate of the forest, and bundle {bdir}'s forest "
                         "reads another feature set; use adaptive-cnn, -stats or -hfc")

    def adversary(x224: np.ndarray, label: np.ndarray, levels: int) -> np.ndarray:
        s = adaptive.AttackSettings(eps=eps, steps=steps, levels=levels, batch_size=1,
                                    **({} if det_weight is None else {"det_weight": det_weight}))
        return adaptive.run_attack(models, spec, s, x224, label)

    return adversary, vic


def _check_writable(ds: Any, in_path: Path) -> None:
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_encapsulated and str(ts) not in _REENCODE_PLUGIN:
        raise AttackWriteError(
            f"{in_path}: transfer syntax {ts.name} ({ts}) is lossy or has no lossless encoder "
            "here; decompress it first (e.g. `dcmdjpeg IN OUT`) and attack the uncompressed copy"
        )


def attack_dicom_native(in_path: Path, out_path: Path, victim: Any,
                        attack: attacks.NativeAttack, *, keep_uid: bool = False,
                        seed: int = 0) -> AttackResult:
    """Attack a DICOM file at its native matrix through ``victim``'s own preprocessing (issue 15).

    ``victim`` maps a (n, rows, cols, 1) tensor in [0, 1] to logits (a zoo member, or
    ``site_victim``: a site's own model behind its resize). Each frame is attacked away from
    the victim's own prediction, rounded to the BitsStored grid and written back in the same
    transfer syntax, bit depth, sign and photometric interpretation by the writer of
    ``attack_dicom``; no 224x224 detour and no mapping back.
    """
    def attack_frame(unit_frame: np.ndarray, levels: int, f: int
                     ) -> tuple[np.ndarray, float, float]:
        unit = unit_frame.astype(np.float32)[None]
        logits = _logits(victim, unit)
        label = attacks.predicted_class(logits)
        native = attacks.native_attack(victim, unit, label, attack, levels=levels,
                                       seed=seed + f, batch_size=1)[0]
        return (native, float(attacks.victim_margin(logits, label)[0]),
                float(attacks.victim_margin(_logits(victim, native[None]), label)[0]))

    return _attack_frames(in_path, out_path, attack_frame, keep_uid=keep_uid,
                          method=attack.method, param=attack.eps)


def _logits(victim: Any, x: np.ndarray) -> np.ndarray:
    out = np.asarray(victim(x[..., None].astype(np.float32)))
    return out.reshape(len(x), -1) if out.ndim > 1 and out.shape[-1] > 1 else out.reshape(-1)


OUTPUT_KINDS = ("auto", "logit", "probability")


class SiteVictim:
    """A site's own classifier behind its own preprocessing, as a native-matrix victim.

    Reads (n, rows, cols, 1) in [0, 1], resizes by ``pipeline`` (train.zoo.Pipeline), scales
    by ``input_scale`` (e.g. 255 for a model trained on 0..255), repeats the grey channel when
    the model takes three, and returns logits: a sigmoid or softmax output is turned back into
    log-odds / log-probabilities so the attack's loss is the model's own cross-entropy.
    """

    def __init__(self, model: Any, pipeline: Any, *, channels: int = 1,
                 probability: bool = False, input_scale: float = 1.0) -> None:
        self.model = model
        self.pipeline = pipeline
        self.channels = channels
        self.probability = probability
        self.input_scale = float(input_scale)

    def __call__(self, x: Any, training: bool = False) -> Any:
        import tensorflow as tf

        from train import zoo

        x = zoo.resize_tf(tf.convert_to_tensor(x, tf.float32), self.pipeline)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.channels == 3:
            x = tf.repeat(x, 3, axis=-1)
        out = self.model(x)
        if isinstance(out, dict):  # a SavedModel endpoint answers {name: tensor}
            out = next(iter(out.values()))
        out = tf.cast(out, tf.float32)
        if self.probability:
            p = tf.clip_by_value(out, 1e-7, 1.0 - 1e-7)
            out = (tf.math.log(p) - tf.math.log1p(-p)) if out.shape[-1] in (None, 1) \
                else tf.math.log(p)
        return out


def load_site_victim(path: Path, pipeline: Any, *, output: str = "auto",
                     input_scale: float = 1.0) -> SiteVictim:
    """A site's Keras model file (.keras / .h5) or TensorFlow SavedModel directory as a victim.

    ``output`` "auto" reads a Keras model's last activation (sigmoid/softmax = probability);
    a SavedModel is taken to answer logits unless ``output`` says "probability".
    """
    import keras

    from train import zoo

    zoo.ensure_registered()  # a zoo member saved with model.save() loads as a site model too
    path = Path(path)
    if output not in OUTPUT_KINDS:
        raise ValueError(f"--victim-output {output!r}: use one of {OUTPUT_KINDS}")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise FileNotFoundError(f"--victim {path}: a directory without saved_model.pb is "
                                    "no SavedModel; pass a .keras/.h5 file or a SavedModel dir")
        model = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
        channels, prob = 1, output == "probability"
        try:
            import tensorflow as tf

            sig = tf.saved_model.load(str(path)).signatures["serving_default"]
            spec = next(iter(sig.structured_input_signature[1].values()))
            channels = int(spec.shape[-1] or 1)
        except Exception:  # an unusual signature: assume one channel
            channels = 1
    elif path.is_file() and path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        try:
            model = keras.saving.load_model(str(path), compile=False)
        except Exception as exc:
            raise ValueError(f"--victim {path}: Keras cannot load it ({exc}); save it with "
                             "model.save('site.keras') or export a SavedModel") from exc
        shape = model.inputs[0].shape
        channels = int(shape[-1] or 1)
        last = getattr(model.layers[-1], "activation", None)
        act = getattr(last, "__name__", "")
        prob = output == "probability" or (output == "auto" and act in ("sigmoid", "softmax"))
        fixed = [d for d in shape[1:3] if d is not None]
        if fixed and any(d != pipeline.size for d in fixed):
            raise ValueError(f"--victim {path} takes {tuple(shape[1:3])} inputs but "
                             f"--input-size is {pipeline.size}: pass --input-size {fixed[0]}")
    else:
        raise FileNotFoundError(f"--victim {path}: not a .keras/.h5 file or SavedModel directory")
    if channels not in (1, 3):
        raise ValueError(f"--victim {path} takes {channels} channels; 1 or 3 are supported")
    return SiteVictim(model, pipeline, channels=channels, probability=prob,
                      input_scale=input_scale)
