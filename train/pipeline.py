"""``sentinel train`` as resumable stages: split -> load -> victim -> perturb -> features ->
CNN -> forest -> reference/baseline CNNs -> stacking and thresholds -> test metrics -> bundle.

Every stage writes its result under the work directory (temp file then rename), and is skipped
when its result is already there, so a run that is killed resumes where it stopped (PGD is
checkpointed per chunk of images). Everything is seeded from ``--seed``.

Subset sizes are deliberate: every validation and test image gets its clean copy and one copy
per perturbation of the suite (the test set is balanced per perturbation), while each training
image gets its clean copy and ONE perturbation drawn for it (weighted towards the subtle PGD
and FGSM that are hardest to see), which keeps the PGD cost of the training split at about
half an attack per image.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from train import attacks, datasets
from train.attacks import SUITE, Perturbation

# share of training images that get each perturbation (sums to 1)
TRAIN_DRAW: dict[str, float] = {
    "pgd_0.003": 0.25, "pgd_0.006": 0.15, "fgsm_0.003": 0.15, "fgsm_0.006": 0.10,
    "gaussian_0.008": 0.10, "saltpepper_0.008": 0.10, "contrast_1.1": 0.15,
}
CHUNK = 256


# Native sizes and sensor-noise range (grey levels of 8 bits, at the native matrix) of the
# resampled copies; the defaults made the shipped bundles 20261125-cb7846aa and
# 20261130-8ee30cf0 (the same models as 20261130-d9ff165a, log-odds fusion). A site whose clean
# images are noisier at 224 than Kermany's can raise them (`sentinel train --resample-noise`,
# `--resample-sizes`); measured with 4 levels and sizes up to 1024 (closing note, session 2):
# NIH clean FPR 4.7% -> 1.3%, but Kermany PGD 0.003 detection 0.986 -> 0.755 and NIH PGD 0.006
# 0.997 -> 0.771, because natural noise and a one-level perturbation then look alike at 224.
RESAMPLE_SIZES = (320, 448, 512, 640, 768)
RESAMPLE_NOISE_LEVELS = 2.0
# The gate's share of the false-positive budget on validation clean images, and its log-odds
# per decade of peak power above its threshold (a tenth of a decade: +1).
GATE_FPR = 0.001
GATE_SLOPE = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (recorded in the bundle manifest)."""

    data: str
    out: str
    work: str
    seed: int = 0
    quick: bool = False
    victim_epochs: int = 8
    cnn_epochs: int = 3
    paper_epochs: int = 3
    paper_max_images: int = 1200  # training images (each clean + perturbed) for paper CNNs
    trees: int = 200
    max_depth: int = 8  # 200 trees: 2 MB and 0.05 ms at depth 8; 6.7 MB at 12 (same val AUC)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    resample_augment: float = 0.5  # share of training images also given a resampled copy
    resample_sizes: tuple[int, ...] = RESAMPLE_SIZES
    resample_noise_levels: float = RESAMPLE_NOISE_LEVELS
    train_draw: dict[str, float] = field(default_factory=lambda: dict(TRAIN_DRAW))
    # How the parts are weighted (detector.scoring.fuse): "logit" (log-odds, the default since
    # bundle 2026-11-30) or the paper's "stack" (probabilities); w_cnn is searched in that space.
    fusion: str = "logit"
    # The forest's inputs (detector.features.FEATURE_SETS). v3 (v1 and the stride-grid peaks)
    # is an option: measured with the shipped CNN, a v3 forest flagged 3.5% of clean NIH
    # images (closing note of session 6), so the peaks go to the gate below instead.
    feature_set: str = "sentinel-features-v1"
    # The stride-grid gate (detector.scoring.apply_gate): its threshold is the GATE_FPR point
    # of the validation clean images' stride_grid_peaks, and the operating threshold is then
    # calibrated on the gated scores, so the 1% false-positive budget holds for both together.
    grid_gate: bool = True
    # The victim zoo (train.zoo, train.zoo_examples): attacks at the native matrix through the
    # drawn member's own resize, and modality processing as clean. Examples are drawn from
    # every family of ``zoo_families``; those of ``zoo_holdout`` are left out of the detector's
    # training (leave-one-family-out evaluation). Members are cached under ``zoo_work``
    # (default <work>/zoo-members) by split digest.
    zoo: bool = True
    zoo_families: tuple[str, ...] = ("strided", "maxpool", "avgpool", "residual", "blurpool",
                                     "depthwise", "patchify", "vit")
    zoo_holdout: tuple[str, ...] = ()
    zoo_work: str = ""
    zoo_train_images: int = 2048
    zoo_val_images: int = 640
    zoo_member_epochs: int | None = None
    # Also draw examples stored at 12 bits (half as many training pairs as the 8-bit draw, as
    # many validation pairs, each group with its own 1% clean budget): clinical CR/DX is stored
    # at 10-16 bits, where an attack moves a pixel by many grey levels, not one or two
    zoo_12bit: bool = False
    # A secret site bundle (train.secret): the CNN's shape and seed, the forest's features and
    # seed, and the zoo families drawn from the site's secret (only its salted digest is here)
    secret: Any = None  # train.secret.SecretDraws
    # Adversarial training of the detector CNN (issue 19): `train.adaptive --split train --out
    # DIR` folders whose adaptive examples (each with its clean image) join the CNN's training
    # pairs, repeated ``harden_repeat`` times; thresholds stay calibrated on clean images only
    harden: tuple[str, ...] = ()
    harden_repeat: int = 8
    # Train the detector on one of n disjoint parts of the training split's patients, as
    # (part, n), 1-based (datasets.patient_parts): bundles on different parts share no training
    # image, the stand-in for a site whose images the public bundle never saw (issue 19). The
    # victim, validation and test stay the whole split's, so thresholds and figures compare.
    patient_part: tuple[int, int] | None = None
    # How the detector CNN pools its last feature maps (train.detector_cnn.CNN_POOLS):
    # "global" (the shipped bundle) or "tile-min", the image scored by its least suspicious of
    # 3x3 tiles, so a clean source's local oddities do not raise the score (README, "Tile-min
    # pooling": no reliable gain measured). Model files are tagged "-tilemin".
    cnn_pool: str = "global"
    # How many detector networks the CNN averages (`sentinel train --cnn-members`): the further
    # ones train from their own seeds on the first one's high-pass stem, and the runtime runs
    # them as one fused model (detector_cnn.build_fused: 0.12 ms per extra member). Why: over
    # training runs of a site bundle, the mean CNN caught more of the public-bundle attacks
    # than any single run a site could pick (README, "Averaging CNNs").
    cnn_members: int = 1
    # How many high-pass stems those networks read (`sentinel train --cnn-stems`): with 2,
    # ``cnn_random_members`` more networks (None: as many as ``cnn_members``) train on a frozen
    # stem of random high-pass kernels drawn from the CNN's seed (a site bundle's: from its
    # secret), and the CNN is the mean of all of them. Why: on patients the public bundle never
    # saw, two stems caught 85-88% of the strongest public-bundle attack on average against 74%
    # for 5 networks on one stem, at fewer false alarms on NIH (README, "Two stems").
    cnn_stems: int = 1
    cnn_random_members: int | None = None
    # The random stem's shape (`--cnn-random-stem`, RANDOM_STEMS): "full" (every pixel, like
    # the trained stem) or "strided" (build_shipped's strided networks: about 0.25 ms less per
    # image, as many attacks caught on average, but on one of two fresh secrets 3-14% of NIH
    # flagged against 1-3% with "full": README, "Two stems").
    cnn_random_stem: str = "full"

    def __post_init__(self) -> None:
        from detector.features import FEATURE_SETS
        from detector.scoring import FUSIONS

        if self.fusion not in FUSIONS:  # at construction, not after 20 minutes of training
            raise ValueError(f"fusion {self.fusion!r}: use one of {FUSIONS}")
        from train.detector_cnn import CNN_POOLS

        if self.cnn_pool not in CNN_POOLS:
            raise ValueError(f"CNN pooling {self.cnn_pool!r}: use one of {list(CNN_POOLS)}")
        if not 1 <= self.cnn_members <= MAX_CNN_MEMBERS:
            raise ValueError(f"{self.cnn_members} CNN members: give 1 to {MAX_CNN_MEMBERS} "
                             "(each costs about 0.12 ms per image and a training run)")
        if self.cnn_stems not in (1, 2):
            raise ValueError(f"{self.cnn_stems} CNN stems: give 1 or 2")
        if self.cnn_random_members is not None:
            if self.cnn_stems != 2:
                raise ValueError("CNN random members train on a second stem: add --cnn-stems 2")
            if not 1 <= self.cnn_random_members <= MAX_CNN_MEMBERS:
                raise ValueError(f"{self.cnn_random_members} CNN random members: give 1 to "
                                 f"{MAX_CNN_MEMBERS}")
        if self.cnn_random_stem not in RANDOM_STEMS:
            raise ValueError(f"random stem {self.cnn_random_stem!r}: use one of {RANDOM_STEMS}")
        if self.cnn_members + self.random_members > MAX_CNN_NETWORKS:
            raise ValueError(f"{self.cnn_members} + {self.random_members} CNN networks on two "
                             f"stems: at most {MAX_CNN_NETWORKS} in all (the latency budget); "
                             "give fewer --cnn-members or --cnn-random-members")
        if self.feature_set not in FEATURE_SETS:
            raise ValueError(f"feature set {self.feature_set!r}: use one of "
                             f"{list(FEATURE_SETS)}")
        from train.zoo import FAMILIES

        unknown = [f for f in (*self.zoo_families, *self.zoo_holdout) if f not in FAMILIES]
        if unknown:
            raise ValueError(f"zoo families {unknown}: use of {list(FAMILIES)}")
        if self.zoo_12bit and not self.zoo:
            raise ValueError("the 12-bit zoo examples need the zoo: drop --no-zoo")
        if self.zoo and not set(self.zoo_families) - set(self.zoo_holdout):
            raise ValueError("every zoo family is held out: keep at least one for training")
        if self.patient_part is not None:
            k, n = self.patient_part
            if n < 2 or not 1 <= k <= n:
                raise ValueError(f"patient part {k} of {n}: give K/N with 1 <= K <= N, N >= 2")
            if self.zoo:
                # its examples do not record which training image (so which patient) made them
                raise ValueError("a patient part trains without the zoo: add --no-zoo")

    def quickened(self) -> TrainConfig:
        """A small run for development and smoke tests (minutes, not an hour)."""
        return replace(self, victim_epochs=2, cnn_epochs=2, paper_epochs=1,
                       paper_max_images=150, trees=50,
                       zoo_families=tuple(f for f in self.zoo_families
                                          if f in ("maxpool", "avgpool")) or self.zoo_families,
                       zoo_train_images=64, zoo_val_images=32, zoo_member_epochs=1)

    @property
    def secret_tag(self) -> str:
        """Model-file suffix of a secret bundle's drawn choices ("" without a secret)."""
        return f"-secret-{self.secret.tag}" if self.secret is not None else ""

    @property
    def pool_tag(self) -> str:
        """Model-file suffix of the detector CNN's pooling ("" for the shipped "global")."""
        return "" if self.cnn_pool == "global" else "-" + self.cnn_pool.replace("-", "")

    @property
    def random_members(self) -> int:
        """How many networks train on the random second stem (0 with one stem)."""
        if self.cnn_stems == 1:
            return 0
        return self.cnn_members if self.cnn_random_members is None else self.cnn_random_members

    @property
    def random_strided(self) -> bool:
        """Whether the random stem's networks take build_shipped's strided shape."""
        return self.cnn_random_stem == "strided"

    @property
    def members_tag(self) -> str:
        """Suffix of the CNN's member and stem count ("" for one network)."""
        return ensemble_name("", self.cnn_members, self.random_members, self.random_strided)

    @property
    def part_tag(self) -> str:
        """Model-file suffix of a patient part ("" for the whole training split)."""
        return "" if self.patient_part is None else "-part{}of{}".format(*self.patient_part)

    @property
    def zoo_tag(self) -> str:
        """Model-file suffix of this zoo setting ("" without the zoo; CNN epochs other than
        the default are named too, so a rerun with --cnn-epochs trains anew)."""
        if not self.zoo:
            return ""
        epochs = "" if self.cnn_epochs == TrainConfig.cnn_epochs else f"-e{self.cnn_epochs}"
        return ("-zoo" + "-12bit" * self.zoo_12bit
                + "".join(f"-no{f}" for f in sorted(self.zoo_holdout)) + epochs)


MAX_CNN_MEMBERS = 5  # 5 members: the CNN alone about 1.0 ms, within the 2.0 ms budget
MAX_CNN_NETWORKS = 6  # on both stems: 3 + 3 full-resolution took 2.04-2.40 ms in all
RANDOM_STEMS = ("full", "strided")  # the random stem's shapes (TrainConfig.cnn_random_stem)


QUICK_SIZES = {"train": 400, "val": 160, "test": 160}


class Work:
    """The work directory: atomic writes and 'already done' checks for each stage."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_npy(self, rel: str, arr: np.ndarray) -> Path:
        p = self.path(rel)
        tmp = p.with_name(p.name + ".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, p)
        return p

    def load_npy(self, rel: str) -> np.ndarray:
        """Memory-mapped read-only: the page cache, not the heap, holds the big image arrays
        (a full run otherwise peaks near 15 GB and was OOM-killed on a 24 GB machine)."""
        return np.load(self.path(rel), mmap_mode="r")

    def has(self, rel: str) -> bool:
        return self.path(rel).exists()

    def save_json(self, rel: str, obj: Any) -> None:
        p = self.path(rel)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
        os.replace(tmp, p)

    def load_json(self, rel: str) -> Any:
        return json.loads(self.path(rel).read_text())

    def cached_npy(self, rel: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        if self.has(rel):
            return self.load_npy(rel)
        arr = make()
        self.save_npy(rel, arr)
        return arr


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- split and clean arrays

def stage_split(cfg: TrainConfig, work: Work) -> datasets.Split:
    if work.has("split.json"):
        split = datasets.Split.from_json(work.path("split.json"))
        if split.seed != cfg.seed or Path(split.root) != Path(cfg.data).resolve():
            raise ValueError(
                f"work dir {work.root} holds a split of {split.root} seed {split.seed}, not "
                f"{cfg.data} seed {cfg.seed}: use another --work directory"
            )
        return split
    split = datasets.make_split(Path(cfg.data), seed=cfg.seed, fractions=cfg.fractions)
    if cfg.quick:
        rng = np.random.default_rng(cfg.seed)
        parts = {}
        for name in datasets.SPLIT_NAMES:
            recs = split.part(name)
            keep = np.sort(rng.permutation(len(recs))[: QUICK_SIZES[name]])
            parts[name] = tuple(recs[i] for i in keep)
        split = replace(split, **parts)
    split.to_json(work.path("split.json"))
    log(f"split {split.summary()}")
    return split


@dataclass(frozen=True)
class SplitArrays:
    """Clean 224x224 inputs of one split, their labels (-1 unknown) and source grids."""

    name: str
    root: str
    records: tuple[datasets.Record, ...]
    x: np.ndarray
    y: np.ndarray
    levels: np.ndarray
    native_224: bool  # every image is stored at 224x224: the delta maps back by identity


def stage_arrays(split: datasets.Split, name: str, work: Work) -> SplitArrays:
    recs = split.part(name)
    if not work.has(f"clean/{name}.npy"):
        x, y, levels = datasets.load_split_arrays(Path(split.root), recs, progress=f"load {name}")
        work.save_npy(f"clean/{name}_y.npy", y)
        work.save_npy(f"clean/{name}_levels.npy", np.asarray(levels, np.int64))
        work.save_npy(f"clean/{name}_native224.npy",
                      np.asarray([_is_native_224(Path(split.root) / r.rel) for r in recs]))
        work.save_npy(f"clean/{name}.npy", x)
    return load_split_arrays_cached(split, name, work)


def load_split_arrays_cached(split: datasets.Split, name: str, work: Work) -> SplitArrays:
    return SplitArrays(
        name=name, root=split.root, records=split.part(name), x=work.load_npy(f"clean/{name}.npy"),
        y=work.load_npy(f"clean/{name}_y.npy"), levels=work.load_npy(f"clean/{name}_levels.npy"),
        native_224=bool(np.all(work.load_npy(f"clean/{name}_native224.npy"))),
    )


def _is_native_224(path: Path) -> bool:
    img = datasets.load_native(path)
    return img.native.shape == (224, 224)


# ---------------------------------------------------------------- victim

def stage_victim(cfg: TrainConfig, work: Work, tr: SplitArrays, va: SplitArrays) -> Any:
    from train import victim

    path = work.path(victim.VICTIM_FILE)
    if path.exists():
        return victim.load_victim(path)
    if np.any(tr.y < 0) or np.any(va.y < 0):
        raise ValueError(
            f"{cfg.data}: the victim classifier needs a label for every training and validation "
            "image: add labels.csv with filename,label,patient_id columns"
        )
    log("training the victim classifier")
    model = victim.train_victim(tr.x, tr.y, va.x, va.y,
                                victim.VictimConfig(epochs=cfg.victim_epochs, seed=cfg.seed))
    tmp = path.with_name("tmp-" + path.name)
    victim.save_victim(model, tmp)
    os.replace(tmp, path)
    return model


# ---------------------------------------------------------------- perturbations

def attack_labels(model: Any, arr: SplitArrays) -> np.ndarray:
    """True labels where known, else the victim's own prediction (untargeted attack)."""
    from train import victim

    y = arr.y.astype(np.float32)
    if np.any(arr.y < 0):
        pred = (victim.predict_logits(model, arr.x) > 0).astype(np.float32)
        y = np.where(arr.y < 0, pred, y)
    return y


def mapped_name(arr: SplitArrays, name: str) -> str:
    """The cache name of a perturbation's images (and their features and scores): sources
    stored larger than 224 carry the native mapping in it, since the stored pixels depend on it."""
    return name if arr.native_224 else f"{name}-{attacks.DEFAULT_UPSAMPLING}"


def perturb_and_store(p: Perturbation, arr: SplitArrays, idx: np.ndarray, model: Any,
                      attack_fn: Any, work: Work, rel_dir: str, seed: int,
                      desc: str) -> np.ndarray:
    """Perturb images ``idx`` of a split, map onto their native grid, re-read as the detector does.

    Chunked: each chunk of CHUNK images is written as soon as it is done, so an interrupted
    run loses at most one chunk. Returns the (len(idx), 224, 224) detector inputs, cached
    under ``mapped_name`` (a work dir made with another native mapping is never read back).
    """
    from tqdm import tqdm

    kind = mapped_name(arr, p.name)
    final = f"{rel_dir}/{kind}.npy"
    if work.has(final):
        return work.load_npy(final)
    labels = attack_labels(model, arr) if p.needs_victim else None
    chunks = []
    starts = list(range(0, len(idx), CHUNK))
    for ci, start in enumerate(tqdm(starts, desc=desc, leave=False)):
        rel = f"{rel_dir}/{kind}.part{ci:04d}.npy"
        if work.has(rel):
            chunks.append(work.load_npy(rel))
            continue
        sel = idx[start:start + CHUNK]
        rng = np.random.default_rng([seed, ci])
        x = arr.x[sel]
        adv = attacks.perturb224(p, x, labels=None if labels is None else labels[sel],
                                 attack=attack_fn, rng=rng)
        out = map_to_detector_input(arr, sel, x, adv - x)
        work.save_npy(rel, out)
        chunks.append(out)
    full = (np.concatenate(chunks) if chunks
            else np.empty((0, 224, 224), np.float32))
    work.save_npy(final, full)
    for ci in range(len(starts)):
        work.path(f"{rel_dir}/{kind}.part{ci:04d}.npy").unlink(missing_ok=True)
    return full


def map_to_detector_input(arr: SplitArrays, sel: np.ndarray, x224: np.ndarray,
                          delta224: np.ndarray) -> np.ndarray:
    """Delta at 224 -> native grid (attacks.to_native) -> the runtime's resize, per image."""
    if arr.native_224 and len(set(arr.levels[sel].tolist())) <= 1:
        return attacks.to_native(x224, delta224, int(arr.levels[sel][0]) if len(sel) else 255)
    preprocess = datasets._preprocess()
    out = np.empty_like(x224)
    for j, i in enumerate(sel):
        img = datasets.load_native(Path(arr.root) / arr.records[i].rel)
        nat = attacks.to_native(img.native, delta224[j], img.levels)
        out[j] = preprocess.resize_to_input(nat[None])[0]
    return out


def stage_perturb_eval(cfg: TrainConfig, work: Work, arr: SplitArrays, model: Any,
                       attack_fn: Any) -> dict[str, np.ndarray]:
    """Every perturbation of the suite on every image of a split (val and test)."""
    out = {}
    idx = np.arange(len(arr.x))
    for k, p in enumerate(SUITE):
        out[p.name] = perturb_and_store(p, arr, idx, model, attack_fn, work,
                                        f"pert/{arr.name}", cfg.seed * 1000 + 100 + k,
                                        f"{arr.name} {p.name}")
    return out


def train_assignment(cfg: TrainConfig, n: int) -> np.ndarray:
    """Which perturbation each training image gets (index into SUITE), seeded."""
    names = [p.name for p in SUITE]
    probs = np.array([cfg.train_draw.get(nm, 0.0) for nm in names], np.float64)
    probs /= probs.sum()
    rng = np.random.default_rng([cfg.seed, 7])
    return rng.choice(len(names), size=n, p=probs)


def stage_perturb_train(cfg: TrainConfig, work: Work, arr: SplitArrays, model: Any,
                        attack_fn: Any) -> tuple[np.ndarray, np.ndarray]:
    """One drawn perturbation per training image: (n, 224, 224) perturbed and the kind index."""
    kinds = work.cached_npy("pert/train_kinds.npy", lambda: train_assignment(cfg, len(arr.x)))
    pert = np.empty_like(arr.x)
    for k, p in enumerate(SUITE):
        idx = np.flatnonzero(kinds == k)
        pert[idx] = perturb_and_store(p, arr, idx, model, attack_fn, work, "pert/train",
                                      cfg.seed * 1000 + k, f"train {p.name}")
    return pert, kinds


# ---------------------------------------------------------------- resampled-source copies



def resampled_pair(x224: np.ndarray, delta224: np.ndarray, rng: np.random.Generator,
                   sizes: tuple[int, ...] = RESAMPLE_SIZES,
                   noise_levels: float = RESAMPLE_NOISE_LEVELS,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A clean image as a different acquisition chain would store it, and its perturbed copy.

    Why: Kermany images are 224x224 double-JPEG, almost noise-free at 224; a detector trained
    on them alone learns "any pixel noise at 224 = tampering" and flags clean images from
    sources stored at a larger matrix with their own sensor noise. Here the clean image is
    upsampled (bicubic) to a random native size of ``sizes``, given sensor-like Gaussian noise
    of a random sigma up to ``noise_levels`` grey levels at that size,
    rounded to 8 bits, and read back through the runtime path (area resize to 224); the
    perturbed copy adds the same image's perturbation delta mapped onto that native grid with
    ``attacks.to_native``. The mapping here is "bilinear", which keeps only about half of a
    high-frequency delta after the read-back: weaker, smoothed positives teach the detector
    the hard case (the shipped bundle was trained this way); attacks for evaluation use the
    default "exact" mapping, which the victim reads back unweakened.
    """
    from detector import preprocess

    native = resampled_native(x224, int(rng.choice(sizes)), rng, noise_levels)
    clean = preprocess.resize_to_input(native[None])[0]
    pert = preprocess.resize_to_input(
        attacks.to_native(native, delta224, 255, upsample="bilinear")[None])[0]
    return clean, pert


def resampled_native(x224: np.ndarray, size: int, rng: np.random.Generator,
                     noise_levels: float = RESAMPLE_NOISE_LEVELS) -> np.ndarray:
    """A 224 image as a ``size`` x ``size`` acquisition would store it: bicubic upsampling,
    Gaussian sensor noise of a drawn sigma up to ``noise_levels`` grey levels, 8-bit rounding."""
    from PIL import Image

    up = np.asarray(Image.fromarray(x224.astype(np.float32), mode="F")
                    .resize((size, size), Image.BICUBIC), np.float32)
    sigma = float(rng.uniform(0.0, noise_levels / 255.0))
    return attacks.quantise(up + rng.normal(0.0, sigma, up.shape).astype(np.float32), 255)


def stage_resampled(cfg: TrainConfig, work: Work, name: str, x: np.ndarray, pert: np.ndarray,
                    idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Resampled clean/perturbed copies of images ``idx`` (delta = their stored perturbation)."""
    from tqdm import tqdm

    settings = {"sizes": list(cfg.resample_sizes),
                "max_sigma_levels": float(cfg.resample_noise_levels)}
    legacy = {"sizes": list(RESAMPLE_SIZES), "max_sigma_levels": RESAMPLE_NOISE_LEVELS}
    made = (work.load_json("resampled/settings.json") if work.has("resampled/settings.json")
            else legacy if work.has(f"resampled/{name}_pert.npy") else settings)
    if made != settings:
        raise ValueError(
            f"{work.root}: its resampled copies were made with other settings ({made} vs "
            f"{settings}); pass a fresh --work directory (or delete resampled/ and "
            "feat/*/resampled_*.npy in it)")
    work.save_json("resampled/settings.json", settings)
    if work.has(f"resampled/{name}_pert.npy"):
        return work.load_npy(f"resampled/{name}_clean.npy"), work.load_npy(
            f"resampled/{name}_pert.npy")
    rng = np.random.default_rng([seed, 23])
    clean = np.empty((len(idx), 224, 224), np.float32)
    out = np.empty_like(clean)
    for j, i in enumerate(tqdm(idx, desc=f"resampled copies {name}", leave=False)):
        clean[j], out[j] = resampled_pair(x[i], pert[i] - x[i], rng, cfg.resample_sizes,
                                          cfg.resample_noise_levels)
    work.save_npy(f"resampled/{name}_clean.npy", clean)
    work.save_npy(f"resampled/{name}_pert.npy", out)
    return clean, out


# ---------------------------------------------------------------- the victim zoo

def stage_zoo(cfg: TrainConfig, work: Work, split: datasets.Split, tr: SplitArrays,
              va: SplitArrays, te: SplitArrays
              ) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """Zoo members (trained or cached) and the zoo examples of train and val, each whole: the
    held-out families are dropped where the detector is fitted, so every fold shares them.
    Examples come as named sets ("zoo" stored at 8 bits, "zoo12" at 12), each cached apart,
    so adding the 12-bit draw leaves the 8-bit examples and their features as they were."""
    from train import zoo_examples

    zoo_work = Path(cfg.zoo_work) if cfg.zoo_work else work.path("zoo-members")
    members = zoo_examples.ensure_members(
        zoo_work, cfg.zoo_families, split.digest, {"train": tr.x, "val": va.x, "test": te.x},
        {"train": tr.y, "val": va.y, "test": te.y}, cfg.zoo_member_epochs, log=log)
    draw = zoo_examples.ZooDraw(families=tuple(cfg.zoo_families))
    ex_tr = zoo_examples.stage_zoo_examples(work.root, "train", tr.x, cfg.zoo_train_images,
                                            draw, zoo_work, split.digest, cfg.seed, log=log)
    ex_va = zoo_examples.stage_zoo_examples(work.root, "val", va.x, cfg.zoo_val_images,
                                            draw, zoo_work, split.digest, cfg.seed + 1, log=log)
    sets_tr, sets_va = {"zoo": ex_tr}, {"zoo": ex_va}
    if cfg.zoo_12bit:
        draw12 = replace(draw, levels=4095)
        sets_tr["zoo12"] = zoo_examples.stage_zoo_examples(
            work.root, "train-12bit", tr.x, cfg.zoo_train_images // 2, draw12, zoo_work,
            split.digest, cfg.seed + 2, log=log)
        sets_va["zoo12"] = zoo_examples.stage_zoo_examples(
            work.root, "val-12bit", va.x, cfg.zoo_val_images, draw12, zoo_work, split.digest,
            cfg.seed + 3, log=log)
    return sets_tr, sets_va, members


def sum_examples(sets: dict[str, Any]) -> Any:
    """The named zoo example sets as one (train.zoo_examples.ZooExamples), in order."""
    first, *rest = sets.values()
    for ex in rest:
        first = first + ex
    return first


def zoo_cached(sets: dict[str, Any], side: str,
               compute: Callable[[str, np.ndarray], Any]) -> Any:
    """``compute(cache kind, images)`` over each named zoo example set's ``side`` ("clean" or
    "attacked"), concatenated in the sets' order (an array, or a dict of arrays per part)."""
    outs = [compute(f"{name}_{side}", getattr(ex, side)) for name, ex in sets.items()]
    if isinstance(outs[0], dict):
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return np.concatenate(outs)


# ---------------------------------------------------------------- features

def feature_dir(feature_set: str) -> str:
    """Work-dir folder of one feature set's cache: "feat" for v1 (older work dirs keep their
    caches), "feat-v3" and so on for the others."""
    from detector import features

    if feature_set == features.FEATURE_SET:
        return "feat"
    return "feat-" + feature_set.rsplit("-", 1)[1]


def features_of(work: Work, split_name: str, kind: str, x: np.ndarray,
                feature_set: str) -> np.ndarray:
    """detector.features on (n, 224, 224), cached per feature set: the exact runtime code."""
    from detector import features

    if len(x) == 0:
        return np.empty((0, len(features.FEATURE_SETS[feature_set])), np.float64)
    return work.cached_npy(f"{feature_dir(feature_set)}/{split_name}/{kind}.npy",
                           lambda: features.extract_batch(x, feature_set))


# ---------------------------------------------------------------- detector models

@dataclass(frozen=True)
class DetectorSets:
    """Clean/perturbed detector inputs of the three splits (labels 0 clean, 1 perturbed)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def detector_sets(tr: SplitArrays, tr_pert: np.ndarray, va: SplitArrays,
                  va_pert: dict[str, np.ndarray], seed: int) -> DetectorSets:
    """Train: each image clean + its drawn perturbation. Val (for early stopping): each image
    clean + one perturbation drawn uniformly from the suite (balanced)."""
    vp = val_mixed_perturbed(va, va_pert, seed)
    return DetectorSets(
        x_train=np.concatenate([tr.x, tr_pert]),
        y_train=np.r_[np.zeros(len(tr.x)), np.ones(len(tr_pert))],
        x_val=np.concatenate([va.x, vp]),
        y_val=np.r_[np.zeros(len(va.x)), np.ones(len(vp))],
    )


def val_mixed_perturbed(va: SplitArrays, va_pert: dict[str, np.ndarray],
                        seed: int) -> np.ndarray:
    """One perturbed copy per validation image, its kind drawn uniformly from the suite."""
    rng = np.random.default_rng([seed, 11])
    pick = rng.integers(0, len(SUITE), size=len(va.x))
    rows = np.arange(len(va.x))
    return np.stack([va_pert[p.name] for p in SUITE])[pick, rows] if len(va.x) else va.x


def with_pairs(sets: DetectorSets, tr_pair: tuple[np.ndarray, np.ndarray],
               va_pair: tuple[np.ndarray, np.ndarray]) -> DetectorSets:
    """``sets`` plus clean/perturbed pairs for training and validation (the shipped CNN's data:
    Kermany pairs, then the resampled-source pairs, then the zoo examples)."""
    (tc, tp), (vc, vp) = tr_pair, va_pair
    return DetectorSets(
        x_train=np.concatenate([sets.x_train, tc, tp]),
        y_train=np.r_[sets.y_train, np.zeros(len(tc)), np.ones(len(tp))],
        x_val=np.concatenate([sets.x_val, vc, vp]),
        y_val=np.r_[sets.y_val, np.zeros(len(vc)), np.ones(len(vp))],
    )


def stage_cnn(cfg: TrainConfig, work: Work, sets: DetectorSets, name: str, builder: str,
              epochs: int, max_images: int | None = None,
              arch: dict[str, Any] | None = None, seed: int | None = None,
              members: int = 1, random_members: int = 0,
              random_strided: bool = False) -> Path:
    """Train a detector CNN and export it to TFLite; resumable (each trained network is kept as
    ``<name>.keras``). ``arch``: build_shipped's shape (a secret bundle's draw); ``seed``: the
    training seed (default ``cfg.seed``). A "shipped" CNN is exported in its fused form
    (detector_cnn.build_fused, the same function, faster); with ``members`` > 1 the further
    members (``<name>-m2``...) train from their own seeds on the first one's frozen high-pass
    stem, and ``random_members`` networks (``<name>-rstem1``..., ``-strided`` in
    build_shipped's cheaper strided shape) train on a frozen second stem of random high-pass
    kernels drawn from ``seed``; the export
    (``ensemble_name``, its Keras original beside it) scores the mean of their probabilities."""
    from train import detector_cnn

    out = ensemble_name(name, members, random_members, random_strided)
    tfl = work.path(f"models/{out}.tflite")
    if tfl.exists() and work.has(f"models/{out}.keras"):
        return tfl
    x, y = sets.x_train, sets.y_train
    if max_images is not None and len(x) > 2 * max_images:
        # keep pairs balanced: max_images clean and max_images perturbed
        rng = np.random.default_rng([cfg.seed, 13])
        n = len(x) // 2
        keep = np.sort(rng.permutation(n)[:max_images])
        x, y = np.concatenate([x[keep], x[n + keep]]), np.r_[y[keep], y[n + keep]]
    arch = arch or {}
    seed = cfg.seed if seed is None else seed
    names = [name] + [f"{name}-m{i + 1}" for i in range(1, members)]
    seeds = [member_seed(seed, i) for i in range(members)]
    train_sets = DetectorSets(x, y, sets.x_val, sets.y_val)
    nets: list[Any] = []
    for member_name, member_s in zip(names, seeds, strict=True):
        nets.append(train_cnn_member(
            work, train_sets, member_name, builder, epochs, arch, member_s,
            frozen_stem=nets[0].get_layer("highpass").get_weights()[0] if nets else None))
    if random_members:
        filters = nets[0].get_layer("highpass").get_weights()[0].shape[-1]
        random_stem = detector_cnn.random_highpass_kernels(filters, seed)
        # each stem's i-th network trains from the same seed
        random_seeds = [member_seed(seed, i) for i in range(random_members)]
        for i, member_s in enumerate(random_seeds):
            names.append(f"{name}-rstem{i + 1}" + "-strided" * random_strided)
            nets.append(train_cnn_member(work, train_sets, names[-1], builder, epochs,
                                         {**arch, **({"strided": True} if random_strided
                                                     else {})},
                                         member_s, frozen_stem=random_stem))
        seeds = seeds + random_seeds
    final = detector_cnn.build_fused(nets, arch) if builder == "shipped" else nets[0]
    if len(nets) > 1:
        save_keras(final, work.path(f"models/{out}.keras"))
        work.save_json(f"models/{out}.json", {"members": names, "seeds": seeds,
                                              "stems": 1 + bool(random_members),
                                              "random_members": random_members,
                                              "builder": builder,
                                              **({"arch": arch} if arch else {})})
    tmp = tfl.with_name("tmp-" + tfl.name)
    detector_cnn.export_tflite(final, tmp)
    os.replace(tmp, tfl)
    return tfl


def ensemble_name(name: str, members: int, random_members: int = 0,
                  strided: bool = False) -> str:
    """The model files of a CNN of ``members`` networks on the trained stem and
    ``random_members`` on the random one (``name`` itself for one network), ``strided`` or
    not."""
    if not random_members:
        return name if members == 1 else f"{name}-x{members}"
    return f"{name}-x{members}+{random_members}" + "-strided" * strided


def member_seed(seed: int, index: int) -> int:
    """The training seed of ensemble member ``index`` (0-based): the first keeps ``seed``, so a
    one-member CNN is the CNN trained before members existed."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % 2**31)


def train_cnn_member(work: Work, sets: DetectorSets, name: str, builder: str, epochs: int,
                     arch: dict[str, Any], seed: int,
                     frozen_stem: np.ndarray | None = None) -> Any:
    """One detector network, trained (or loaded from ``models/<name>.keras``).
    ``frozen_stem``: high-pass kernels this one takes and keeps frozen (the first member's, so
    that build_fused runs both on one stem, or a random stem's)."""
    import keras

    from train import detector_cnn

    keras_path = work.path(f"models/{name}.keras")
    if keras_path.exists():
        return keras.saving.load_model(str(keras_path), safe_mode=True, compile=False)
    model = detector_cnn.build_seeded(builder, arch, seed)
    if frozen_stem is not None:
        hp = model.get_layer("highpass")
        hp.set_weights([frozen_stem])
        hp.trainable = False
    log(f"training CNN {name} ({builder}{arch or ''}) on {len(sets.x_train)} images, "
        f"{epochs} epochs" + (", on a frozen stem" if frozen_stem is not None else ""))
    t0 = time.time()
    model = detector_cnn.train_binary(
        model, sets.x_train, sets.y_train, sets.x_val, sets.y_val,
        detector_cnn.CnnTrainConfig(epochs=epochs, seed=seed), label=name)
    work.save_json(f"models/{name}.json", {"train_images": len(sets.x_train), "epochs": epochs,
                                           "seconds": time.time() - t0, "builder": builder,
                                           **({"arch": arch} if arch else {}),
                                           **({"seed": seed} if frozen_stem is not None
                                              else {})})
    # a fresh, uncompiled copy: the .keras file then carries no optimizer state (3x smaller)
    fresh = detector_cnn.build(builder, arch)  # weights set below: no reseeding
    fresh.set_weights(model.get_weights())
    save_keras(fresh, keras_path)
    return fresh


def save_keras(model: Any, path: Path) -> None:
    """Write a .keras file atomically (a crash leaves the old file or none, never half)."""
    tmp = path.with_name("tmp-" + path.name)
    model.save(str(tmp))
    os.replace(tmp, path)


def cnn_arch(cfg: TrainConfig) -> dict[str, Any] | None:
    """build_shipped's arguments for this run: a secret's drawn shape and the pooling (None:
    the shipped defaults, so a plain bundle's model file and its JSON stay as before)."""
    arch = dict(cfg.secret.cnn_arch) if cfg.secret is not None else {}
    if cfg.cnn_pool != "global":
        arch["pool"] = cfg.cnn_pool
    return arch or None


def harden_examples(cfg: TrainConfig, tr: SplitArrays, keep: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """The adaptive examples of ``cfg.harden`` folders (train.adaptive --split train), their
    clean training images, and a tag of their bytes (the hardened CNN's cache key). Refuses a
    folder crafted on another split or work dir: its indices would name other images.

    ``keep``: a patient part's rows of the training split; examples made from other rows are
    left out, so bundles on different parts still share no training image (a site hardens on
    attacks crafted against the public bundle on its own images)."""
    import hashlib

    advs, cleans, h = [], [], hashlib.sha256(str(cfg.harden_repeat).encode())
    for d in map(Path, cfg.harden):
        sub = json.loads((d / "subset.json").read_text())
        if sub.get("split") != "train" or Path(sub["work"]).resolve() != Path(cfg.work).resolve():
            raise ValueError(f"{d}: crafted on the {sub.get('split')} split of {sub['work']}, "
                             f"not the training split of {cfg.work}; rerun train.adaptive with "
                             "--split train --work " + str(cfg.work))
        idx = np.asarray(sub["indices"], np.int64)
        own = np.ones(len(idx), bool) if keep is None else keep[idx]
        for f in sorted((d / "adv").glob("*.npy")):
            if f.name.startswith("pgd_"):  # plain PGD is in the training set already
                continue
            adv = np.load(f)
            if len(adv) != len(idx):
                raise ValueError(f"{f}: {len(adv)} images for {len(idx)} indices")
            adv = adv[own]
            advs.append(adv.astype(np.float32))
            cleans.append(np.asarray(tr.x[idx[own]], np.float32))
            h.update(f.name.encode() + adv.tobytes())
    if not advs or not sum(map(len, advs)):
        raise ValueError(f"--harden-with {list(cfg.harden)}: no adaptive examples (adv/*.npy)"
                         + ("" if keep is None else " made from this patient part's images"))
    return np.concatenate(advs), np.concatenate(cleans), h.hexdigest()[:8]


def forest_rel(cfg: TrainConfig) -> str:
    """One file per forest setting, so a rerun with another --max-depth, feature set or zoo
    setting refits (v1 forests without the zoo keep their old names)."""
    fdir = feature_dir(cfg.feature_set)
    tag = "" if fdir == "feat" else "-" + fdir.removeprefix("feat-")
    return (f"models/forest-{cfg.trees}trees-depth{cfg.max_depth}{tag}{cfg.zoo_tag}"
            f"{cfg.part_tag}{cfg.secret_tag}.npz")


def stage_forest(cfg: TrainConfig, work: Work, f_train: np.ndarray, y_train: np.ndarray) -> Any:
    from detector.forest import ForestArrays
    from train import fit_detector, secret

    path = work.path(forest_rel(cfg))
    if path.exists():
        return ForestArrays.load(path)
    cols = secret.feature_columns(cfg.secret, cfg.feature_set)
    if cols is not None:  # a secret bundle's drawn features, in the drawn order
        f_train = np.asarray(f_train)[:, cols]
    log(f"fitting forest: {cfg.trees} trees, max_depth {cfg.max_depth}, {len(f_train)} samples"
        f", {f_train.shape[1]} features")
    rf = fit_detector.fit_forest(f_train, y_train, n_estimators=cfg.trees,
                                 max_depth=cfg.max_depth,
                                 seed=cfg.seed if cfg.secret is None else cfg.secret.forest_seed)
    arrays = ForestArrays.from_sklearn(rf)
    tmp = path.with_name("tmp-forest.npz")
    arrays.save(tmp)
    os.replace(tmp, path)
    return ForestArrays.load(path)


def tflite_scores(path: Path, x: np.ndarray) -> np.ndarray:
    """P(perturbed) from the exported TFLite file, one image per invoke as the runtime runs it."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=2)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    outp = interp.get_output_details()[0]["index"]
    out = np.empty(len(x), np.float64)
    for i in range(len(x)):
        interp.set_tensor(inp, np.ascontiguousarray(x[i][None, :, :, None], np.float32))
        interp.invoke()
        out[i] = float(interp.get_tensor(outp).reshape(-1)[0])
    return out


# ---------------------------------------------------------------- scores, stacking, bundle

@dataclass(frozen=True)
class ScoringModels:
    """The scored parts: the shipped CNN as TFLite (exactly what the runtime runs), the
    reference and baseline CNNs as Keras files (batched: 20x faster than one-by-one TFLite
    for 1 GFLOP networks), and the forest arrays."""

    cnn_tflite: Path
    paper_keras: Path
    baseline_keras: Path
    forest_path: Path
    forest: Any
    feature_set: str  # what the forest reads
    grid: bool = False  # also the stride-grid gate's feature ("grid" in the ScoreBook)
    forest_columns: Any = None  # a secret bundle's drawn columns of the feature set, in order

    @functools.cached_property
    def part_tags(self) -> dict[str, str]:
        """Cache key per part: scores are reused only for the very same model (a forest refit
        re-scores the forest, not the CNNs)."""
        import hashlib

        def file_hash(p: Path) -> str:
            return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12]

        h = hashlib.sha256()
        with np.load(self.forest_path, allow_pickle=False) as z:  # arrays, not zip metadata
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
        return {"cnn": file_hash(self.cnn_tflite), "paper_cnn": file_hash(self.paper_keras),
                "baseline_cnn": file_hash(self.baseline_keras), "forest": h.hexdigest()[:12]}


def keras_scores(path: Path, x: np.ndarray) -> np.ndarray:
    import keras

    from train import detector_cnn

    model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
    return detector_cnn.predict(model, x, batch_size=64)


def stage_scores(work: Work, split_name: str, kind: str, x: np.ndarray,
                 feats: np.ndarray, models: ScoringModels,
                 parts: tuple[str, ...] = ("cnn", "forest", "paper_cnn", "baseline_cnn"),
                 ) -> dict[str, np.ndarray]:
    """Scores of each part for one set of images, cached per (model files, set)."""
    makers: dict[str, Callable[[], np.ndarray]] = {
        "cnn": lambda: tflite_scores(models.cnn_tflite, x),
        "forest": lambda: np.asarray(models.forest.predict_proba(
            feats if models.forest_columns is None else np.asarray(feats)[
                :, models.forest_columns]), np.float64),
        "paper_cnn": lambda: keras_scores(models.paper_keras, x),
        "baseline_cnn": lambda: keras_scores(models.baseline_keras, x),
    }
    tags = models.part_tags
    return {part: work.cached_npy(f"scores/{split_name}/{kind}.{part}-{tags[part]}.npy",
                                  makers[part])
            for part in parts}


def grid_values(work: Work, split_name: str, kind: str, x: np.ndarray) -> np.ndarray:
    """The stride-grid gate's feature of each image (the last of feature set v3), cached."""
    from detector import features

    return features_of(work, split_name, kind, x, features.FEATURE_SET_V3)[:, -1]


def score_book(work: Work, models: ScoringModels, arr: SplitArrays,
               pert: dict[str, np.ndarray], clean_only_parts: tuple[str, ...] = (),
               fusion: str = "stack", gate: tuple[float, float] | None = None,
               either: Any = None) -> Any:
    """ScoreBook of a split; ``clean_only_parts`` are scored on clean images only (validation
    needs the reference CNNs only to calibrate their thresholds). With ``models.grid`` each
    kind also gets the gate's feature values ("grid")."""
    from train import evaluate

    all_parts = ("cnn", "forest", "paper_cnn", "baseline_cnn")
    book = {"clean": stage_scores(
        work, arr.name, "clean", arr.x,
        features_of(work, arr.name, "clean", arr.x, models.feature_set), models, all_parts)}
    parts = tuple(p for p in all_parts if p not in clean_only_parts)
    for p in SUITE:
        book[p.name] = stage_scores(
            work, arr.name, p.name, pert[p.name],
            features_of(work, arr.name, p.name, pert[p.name], models.feature_set), models,
            parts)
    if models.grid:
        book["clean"]["grid"] = grid_values(work, arr.name, "clean", arr.x)
        for p in SUITE:
            book[p.name]["grid"] = grid_values(work, arr.name, p.name, pert[p.name])
    return evaluate.ScoreBook(book, fusion, gate, either)


def run_pipeline(cfg: TrainConfig) -> Path:
    """The whole of ``sentinel train``; returns the bundle directory."""
    from detector import bundle as bundle_mod
    from detector import features
    from detector.scoring import GATE_FEATURE, Either
    from train import evaluate, fit_detector, secret, training_bundle, victim

    if cfg.quick:
        cfg = cfg.quickened()
    t_start = time.time()
    work = Work(Path(cfg.work))
    work.save_json("config.json", asdict(cfg))
    timings: dict[str, float] = work.load_json("timings.json") if work.has("timings.json") else {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        result = fn()
        if name not in timings:
            timings[name] = round(time.time() - t0, 1)
            work.save_json("timings.json", timings)
        return result

    split = timed("split", lambda: stage_split(cfg, work))
    tr, va, te = (timed(f"load_{n}", lambda n=n: stage_arrays(split, n, work))
                  for n in datasets.SPLIT_NAMES)
    model = timed("victim", lambda: stage_victim(cfg, work, tr, va))
    attack_fn = attacks.make_gradient_attack(model)
    tr_pert, _kinds = timed("perturb_train",
                            lambda: stage_perturb_train(cfg, work, tr, model, attack_fn))
    va_pert = timed("perturb_val", lambda: stage_perturb_eval(cfg, work, va, model, attack_fn))
    te_pert = timed("perturb_test", lambda: stage_perturb_eval(cfg, work, te, model, attack_fn))

    sets = detector_sets(tr, tr_pert, va, va_pert, cfg.seed)
    rs_idx = np.sort(np.random.default_rng([cfg.seed, 29]).permutation(len(tr.x))[
        : round(cfg.resample_augment * len(tr.x))])
    tr_rs = timed("resampled_train", lambda: stage_resampled(
        cfg, work, "train", tr.x, tr_pert, rs_idx, cfg.seed))
    va_mixed = val_mixed_perturbed(va, va_pert, cfg.seed)
    va_rs = timed("resampled_val", lambda: stage_resampled(
        cfg, work, "val", va.x, va_mixed, np.arange(len(va.x)) if len(rs_idx) else rs_idx,
        cfg.seed + 1))
    zoo_members: list[dict] = []
    if cfg.zoo:
        zoo_tr, zoo_va, zoo_members = timed("zoo", lambda: stage_zoo(cfg, work, split, tr, va,
                                                                     te))
        ex_tr, ex_va = sum_examples(zoo_tr), sum_examples(zoo_va)
        zoo_tr_keep = ~np.isin(ex_tr.family, list(cfg.zoo_holdout))
        zoo_va_keep = ~np.isin(ex_va.family, list(cfg.zoo_holdout))
        log(f"zoo examples: {int(zoo_tr_keep.sum())} training and {int(zoo_va_keep.sum())} "
            f"validation pairs (held out: {list(cfg.zoo_holdout) or 'none'})")
    log("features")
    f_tr = timed("features", lambda: np.concatenate([
        features_of(work, "train", "clean", tr.x, cfg.feature_set),
        features_of(work, "train", "perturbed", tr_pert, cfg.feature_set),
        features_of(work, "train", "resampled_clean", tr_rs[0], cfg.feature_set),
        features_of(work, "train", "resampled_pert", tr_rs[1], cfg.feature_set)]))
    y_tr = np.r_[np.zeros(len(tr.x)), np.ones(len(tr_pert)), np.zeros(len(tr_rs[0])),
                 np.ones(len(tr_rs[1]))]
    part_summary, part_rows = None, None
    if cfg.patient_part is not None:  # the features above are cached for the whole split
        keep = part_rows = datasets.patient_parts(tr.records, cfg.patient_part[1], cfg.seed) == (
            cfg.patient_part[0] - 1)
        rs_keep, pairs = keep[rs_idx], np.r_[keep, keep]  # pairs: clean rows, then perturbed
        rows = np.r_[pairs, rs_keep, rs_keep]
        f_tr, y_tr = f_tr[rows], y_tr[rows]
        sets = replace(sets, x_train=sets.x_train[pairs], y_train=sets.y_train[pairs])
        _kinds = _kinds[keep]
        tr_rs = (tr_rs[0][rs_keep], tr_rs[1][rs_keep])
        part_summary = {"part": cfg.patient_part[0], "of": cfg.patient_part[1],
                        "images": int(keep.sum()),
                        "patients": len({tr.records[i].patient for i in np.flatnonzero(keep)})}
        log("patient part {part} of {of}: {images} training images of {patients} patients"
            .format(**part_summary))
    cnn_sets = with_pairs(sets, tr_rs, va_rs)
    if cfg.zoo:
        f_tr = np.concatenate([
            f_tr,
            *(zoo_cached(zoo_tr, side, lambda kind, x: features_of(
                work, "train", kind, x, cfg.feature_set))[zoo_tr_keep]
              for side in ("clean", "attacked"))])
        n_zoo = int(zoo_tr_keep.sum())
        y_tr = np.r_[y_tr, np.zeros(n_zoo), np.ones(n_zoo)]
        cnn_sets = with_pairs(cnn_sets,
                              (ex_tr.clean[zoo_tr_keep], ex_tr.attacked[zoo_tr_keep]),
                              (ex_va.clean[zoo_va_keep], ex_va.attacked[zoo_va_keep]))
    if cfg.grid_gate:
        # an adaptive attacker (train.adaptive) holds the gate's feature too and takes its
        # clean spread from the training split: cache the v3 features there (~6 s)
        timed("features_v3", lambda: [grid_values(work, "train", k, x) for k, x in
                                      (("clean", tr.x), ("perturbed", tr_pert))])

    cnn_name = "cnn" + cfg.zoo_tag + cfg.part_tag + cfg.secret_tag + cfg.pool_tag
    if cfg.harden:
        h_adv, h_clean, h_tag = harden_examples(cfg, tr, part_rows)
        log(f"hardening: {len(h_adv)} adaptive examples from {list(cfg.harden)}, each "
            f"{cfg.harden_repeat}x in the CNN's training")
        cnn_name += f"-hard-{h_tag}"
        empty = np.empty((0, 224, 224), np.float32)
        cnn_sets = with_pairs(cnn_sets, (np.repeat(h_clean, cfg.harden_repeat, axis=0),
                                         np.repeat(h_adv, cfg.harden_repeat, axis=0)),
                              (empty, empty))
    cnn_path = timed(cnn_name, lambda: stage_cnn(
        cfg, work, cnn_sets, cnn_name, "shipped", cfg.cnn_epochs,
        arch=cnn_arch(cfg), members=cfg.cnn_members, random_members=cfg.random_members,
        random_strided=cfg.random_strided,
        **({"seed": cfg.secret.cnn_seed} if cfg.secret else {})))
    cnn_file = ensemble_name(cnn_name, cfg.cnn_members, cfg.random_members, cfg.random_strided)
    forest = timed("forest", lambda: stage_forest(cfg, work, f_tr, y_tr))
    paper_name, baseline_name = "paper_cnn" + cfg.part_tag, "baseline_cnn" + cfg.part_tag
    paper_tflite = timed(paper_name, lambda: stage_cnn(
        cfg, work, sets, paper_name, "paper", cfg.paper_epochs, cfg.paper_max_images))
    base_sets = baseline_sets(sets, _kinds, len(_kinds))
    timed(baseline_name, lambda: stage_cnn(
        cfg, work, base_sets, baseline_name, "paper", cfg.paper_epochs, cfg.paper_max_images))
    models = ScoringModels(cnn_tflite=cnn_path,
                           paper_keras=work.path(f"models/{paper_name}.keras"),
                           baseline_keras=work.path(f"models/{baseline_name}.keras"),
                           forest_path=work.path(forest_rel(cfg)), forest=forest,
                           feature_set=cfg.feature_set, grid=cfg.grid_gate,
                           forest_columns=secret.feature_columns(cfg.secret, cfg.feature_set))

    log("scoring validation and test")
    val_book = timed("score_val", lambda: score_book(
        work, models, va, va_pert, clean_only_parts=("paper_cnn", "baseline_cnn"),
        fusion=cfg.fusion))
    test_book = timed("score_test", lambda: score_book(work, models, te, te_pert,
                                                       fusion=cfg.fusion))

    # stacking weight and thresholds: validation only (Kermany val + its resampled copies)
    rs_c = stage_scores(work, "val", "resampled_clean", va_rs[0],
                        features_of(work, "val", "resampled_clean", va_rs[0], cfg.feature_set),
                        models, ("cnn", "forest"))
    rs_p = stage_scores(work, "val", "resampled_pert", va_rs[1],
                        features_of(work, "val", "resampled_pert", va_rs[1], cfg.feature_set),
                        models, ("cnn", "forest"))
    yv, mix = val_book.mixed(cfg.seed)
    yv = np.r_[yv, np.zeros(len(va_rs[0])), np.ones(len(va_rs[1]))]
    val_cnn = np.r_[mix["cnn"], rs_c["cnn"], rs_p["cnn"]]
    val_rf = np.r_[mix["forest"], rs_c["forest"], rs_p["forest"]]
    # the clean validation images by source: the threshold keeps the 1% budget on each
    clean_groups = {"kermany": (val_book.part("clean", "cnn"), val_book.part("clean", "forest"),
                                val_book.part("clean", "grid") if cfg.grid_gate else None),
                    "resampled": (rs_c["cnn"], rs_c["forest"],
                                  grid_values(work, "val", "resampled_clean", va_rs[0])
                                  if cfg.grid_gate else None)}
    if cfg.zoo:
        def val_scores(kind: str, x: np.ndarray) -> dict[str, np.ndarray]:
            return stage_scores(work, "val", kind, x,
                                features_of(work, "val", kind, x, cfg.feature_set), models,
                                ("cnn", "forest"))

        def val_grid_of(kind: str, x: np.ndarray) -> np.ndarray:
            return grid_values(work, "val", kind, x)

        zc, za = (zoo_cached(zoo_va, side, val_scores) for side in ("clean", "attacked"))
        zgrid = zoo_cached(zoo_va, "clean", val_grid_of) if cfg.grid_gate else None
        k = zoo_va_keep
        yv = np.r_[yv, np.zeros(int(k.sum())), np.ones(int(k.sum()))]
        val_cnn = np.r_[val_cnn, zc["cnn"][k], za["cnn"][k]]
        val_rf = np.r_[val_rf, zc["forest"][k], za["forest"][k]]
        # each example set's stored and processed clean images: groups of their own
        set_of = np.repeat(list(zoo_va), [len(ex) for ex in zoo_va.values()])
        for set_name in zoo_va:
            for kind, rows in (("stored", ~ex_va.processed), ("processed", ex_va.processed)):
                rows = k & rows & (set_of == set_name)
                if rows.any():
                    clean_groups[f"{set_name}-{kind}"] = (zc["cnn"][rows], zc["forest"][rows],
                                                          None if zgrid is None else zgrid[rows])
    rule: dict[str, Any] = {"name": cfg.fusion}
    gate = val_grid = None
    groups = [fit_detector.CleanGroup(*g) for g in clean_groups.values()]
    if cfg.grid_gate:
        # the gate's threshold: its share of the budget on every clean validation image
        gate = (fit_detector.calibrate_threshold(np.concatenate([g.grid for g in groups]),
                                                 GATE_FPR), GATE_SLOPE)
        rule["gate"] = {"feature": GATE_FEATURE, "threshold": gate[0], "slope": gate[1]}
        log(f"stride-grid gate at {gate[0]:.4f} ({GATE_FPR:.1%} of validation clean images)")
        # the gate's feature of every validation image, in yv's order
        val_grid = np.r_[mix["grid"], clean_groups["resampled"][2],
                         grid_values(work, "val", "resampled_pert", va_rs[1])]
        if cfg.zoo:
            val_grid = np.r_[val_grid, zgrid[zoo_va_keep],
                             zoo_cached(zoo_va, "attacked", val_grid_of)[zoo_va_keep]]
    # w_cnn and the either-part override together, at the operating threshold that keeps the
    # 1% budget on each source's clean validation images (the gate and the parts included)
    pos = yv == 1
    best, grid = fit_detector.search_operating_point(
        groups, val_cnn[pos], val_rf[pos], None if val_grid is None else val_grid[pos],
        cfg.fusion, gate, part_fprs=fit_detector.PART_FPRS if cfg.zoo else (0.0,))
    w_cnn, threshold = best.w_cnn, best.threshold
    either = None
    if best.either_cnn is not None or best.either_rf is not None:
        either = Either(best.either_cnn, best.either_rf, threshold)
        rule["either"] = either.manifest_entry()
        log(f"either-part override: CNN {best.either_cnn}, forest {best.either_rf} "
            f"({best.part_fpr:.2%} of each source's clean validation images each)")
    test_book = replace(test_book, gate=gate, either=either)
    clean_cnn = np.concatenate([g.cnn for g in groups])
    clean_rf = np.concatenate([g.forest for g in groups])
    part_thresholds = {
        "cnn": fit_detector.calibrate_threshold(clean_cnn),
        "forest": fit_detector.calibrate_threshold(clean_rf),
        "paper_cnn": fit_detector.calibrate_threshold(val_book.part("clean", "paper_cnn")),
        "baseline_cnn": fit_detector.calibrate_threshold(val_book.part("clean", "baseline_cnn")),
    }
    log(f"{cfg.fusion} fusion, w_cnn {w_cnn}, calibrated threshold {threshold:.5f}")

    victim_acc = timed("victim_eval", lambda: victim_accuracy(model, te, te_pert))
    test_metrics = timed("metrics", lambda: evaluate.compute_metrics(
        test_book, w_cnn=w_cnn, threshold=threshold, part_thresholds=part_thresholds,
        seed=cfg.seed, n_boot=1000))
    training = {
        "data": str(cfg.data),  # as given: a build machine's absolute path means nothing
        # on another
        "split": split.summary(),
        "config": asdict(cfg),
        "grid": [asdict(g) for g in grid],
        "part_thresholds": part_thresholds,
        "victim": victim_acc,
        "timings_s": timings,
        "models": {n: work.load_json(f"models/{n}.json")
                   for n in dict.fromkeys((cnn_name, cnn_file, paper_name, baseline_name))},
        "patient_part": part_summary,
        "zoo": ({"members": zoo_members, "holdout": list(cfg.zoo_holdout),
                 "example_sets": {n: {"train": len(zoo_tr[n]), "val": len(zoo_va[n]),
                                      "levels": int(zoo_va[n].levels[0]) if len(zoo_va[n])
                                      else None} for n in zoo_tr},
                 "train_pairs": int(zoo_tr_keep.sum()), "val_pairs": int(zoo_va_keep.sum())}
                if cfg.zoo else None),
    }
    metrics = summary_metrics(test_metrics)
    work.save_json("test_metrics.json", test_metrics)
    work.save_json("training.json", training)
    split.to_json(work.path("split.json"))
    # the shipped copy records the data root as given (records are relative to it), not this
    # machine's absolute path; the work dir's copy above keeps it to check --data on resume
    split.to_json(work.path("training", "split.json"), root=str(cfg.data))
    timings["total_wall_s_this_invocation"] = round(time.time() - t_start, 1)
    work.save_json("timings.json", timings)
    check_feature_cache(work, te.x, cfg.feature_set)
    log("writing bundle")
    tfiles = {
        "victim": work.path(victim.VICTIM_FILE),
        "cnn_keras": work.path(f"models/{cnn_file}.keras"),
        "paper_cnn": work.path(f"models/{paper_name}.keras"),
        "paper_cnn_tflite": paper_tflite,
        "baseline_cnn": work.path(f"models/{baseline_name}.keras"),
        "split": work.path("training", "split.json"),
    }
    for src in tfiles.values():  # an old-layout bundle in --out carried them: now unlisted
        (Path(cfg.out) / Path(src).name).unlink(missing_ok=True)
    out = bundle_mod.write_bundle(
        Path(cfg.out),
        cnn_tflite=cnn_path,
        forest=forest,
        feature_names=(features.FEATURE_SETS[cfg.feature_set] if cfg.secret is None
                       else cfg.secret.feature_names),
        feature_set=cfg.feature_set,
        w_cnn=float(w_cnn),
        threshold=float(threshold),
        thresholds={"paper": fit_detector.PAPER_THRESHOLD, "calibrated_fpr_0.01": threshold},
        training_data=training,
        metrics=metrics,
        extra_files={
            "test_metrics": work.path("test_metrics.json"),
            **({"model_card": card} if (card := model_card_path(cfg, work)) else {}),
        },
        versions=training_versions(),
        rule=rule,
    )
    # training-only files in a bundle of their own, so a gateway start hashes only what scoring
    # reads (train.training_bundle: OUT-training, or train/models/default for the shipped one)
    tdir = training_bundle.write_training_bundle(
        training_bundle.training_dir_for(out), bundle_mod.load_manifest(out).bundle_id, tfiles)
    log(f"bundle written to {out}, its training bundle to {tdir}; total "
        f"{time.time() - t_start:.0f} s this invocation")
    return Path(out)


def baseline_sets(sets: DetectorSets, kinds: np.ndarray, n_train: int) -> DetectorSets:
    """Adversarial-training baseline data: training images whose drawn perturbation is PGD
    (either eps), each with its clean copy; validation unchanged."""
    pgd = np.flatnonzero(np.isin(kinds, [i for i, p in enumerate(SUITE) if p.method == "pgd"]))
    x = np.concatenate([sets.x_train[pgd], sets.x_train[n_train + pgd]])
    return DetectorSets(x_train=x, y_train=np.r_[np.zeros(len(pgd)), np.ones(len(pgd))],
                        x_val=sets.x_val, y_val=sets.y_val)


def victim_accuracy(model: Any, arr: SplitArrays, pert: dict[str, np.ndarray]) -> dict:
    """Victim accuracy and AUC on clean test images and under each perturbation (as stored)."""
    from train import fit_detector, victim

    if np.any(arr.y < 0):
        return {"note": "test labels missing: victim accuracy not measured"}
    out = {}
    for name, x in [("clean", arr.x), *pert.items()]:
        logits = victim.predict_logits(model, x)
        out[name] = {"accuracy": float(np.mean((logits > 0) == (arr.y == 1))),
                     "auc": fit_detector.roc_auc(arr.y, logits)}
    return out


def summary_metrics(test_metrics: dict) -> dict:
    """The headline figures for the manifest (the full set is test_metrics.json)."""
    keep = {}
    for name in ("pgd_0.003", "pgd_0.006"):
        m = test_metrics["per_perturbation"][name]
        keep[name] = {"ensemble_auc_ci": m["ensemble"]["auc_ci"],
                      "detection_at_threshold": m["ensemble"]["at_threshold"]["recall"]}
    keep["clean_fpr_at_threshold"] = test_metrics["clean_fpr_at_threshold"]
    keep["overall_auc_ci"] = test_metrics["overall"]["ensemble"]["auc_ci"]
    return keep


def _crafted_on(attack_dir: Path) -> str:
    """" (crafted on bundle <id>)" from a train.adaptive output's suite.json, or ""."""
    try:
        bid = json.loads((attack_dir / "suite.json").read_text()).get("bundle_id")
    except (OSError, ValueError):
        return ""
    return f" (crafted on bundle {bid})" if bid else ""


def model_card_path(cfg: TrainConfig, work: Work | None = None) -> Path | None:
    """MODEL_CARD.md beside the output bundle, written by ``sentinel evaluate`` or by hand;
    a secret bundle's card also says which choices its secret drew (train.secret)."""
    p = Path(cfg.out) / "MODEL_CARD.md"
    text = p.read_text() if p.exists() else ""
    if cfg.secret is not None:
        section = cfg.secret.card_markdown(cfg.feature_set)
        head = text.split("## Secret site bundle")[0].rstrip()  # a rerun replaces its section
        text = (head + "\n\n" if head else "# Model card (secret site bundle)\n\n") + section
        if cfg.harden:
            text += ("\nIts detector CNN was also trained on the adaptive examples of "
                     + ", ".join(f"`{Path(d).name}`{_crafted_on(Path(d))}" for d in cfg.harden)
                     + f" (`sentinel train --harden-with`, each {cfg.harden_repeat} times"
                     + (", only those made from this patient part's images"
                        if cfg.patient_part else "")
                     + "); its thresholds were calibrated on clean images only.\n")
    # the pooling's and the members' notes: a rerun with other settings replaces them
    from train.report import members_note, pool_note

    text = "\n\n".join(par for par in text.split("\n\n")
                       if "`--cnn-pool " not in par and "`--cnn-members " not in par)
    for note in (pool_note(cfg.cnn_pool), members_note(cfg.cnn_members, cfg.cnn_stems,
                                                             cfg.random_strided,
                                                             cfg.random_members)):
        if note:
            text = (text.rstrip() + "\n\n" if text.strip() else "# Model card\n\n") + (
                note.strip() + "\n")
    if not text.strip():
        return None
    keep = (work.path(f"secret{cfg.secret_tag}{cfg.pool_tag}{cfg.members_tag}", "MODEL_CARD.md")
            if cfg.secret is not None else Path(cfg.work) / "MODEL_CARD.md")
    keep.write_text(text)  # write_bundle empties the out dir of unlisted files
    return keep


def training_versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "scikit-learn": sklearn.__version__}


def check_feature_cache(work: Work, x_test: np.ndarray, feature_set: str, n: int = 16) -> None:
    """Refuse to ship a forest fitted on cached features that today's detector.features no
    longer reproduces (the feature code changed since the cache was written)."""
    from detector import features

    fdir = feature_dir(feature_set)
    cached = work.load_npy(f"{fdir}/test/clean.npy")[:n]
    now = features.extract_batch(x_test[:n], feature_set)
    if cached.shape != now.shape or not np.allclose(cached, now, rtol=1e-5, atol=1e-9):
        raise RuntimeError(
            f"cached features under {work.root / fdir} differ from detector.features today: "
            "delete that folder and the models/forest.npz and scores-* entries, then rerun"
        )
