"""Detector training examples from the victim zoo: attacks made the way an attacker makes them,
and modality processing counted as clean (issue 15).

Why: a detector that only ever saw PGD against its own bundled victim keys on that victim's
fingerprint, and one that only ever saw unprocessed Kermany images takes a hospital's CLAHE or
unsharp masking for tampering. Every example here is built as a real one arises:

1. **The stored image.** A training image at Kermany's own 224 matrix, or the same image as a
   larger acquisition would store it (upsampled to a drawn native size, given sensor-like
   noise, rounded to 8 bits; ``train.pipeline.resampled_native``).
2. **The modality's processing**, for a drawn share of images: one drawn kind of
   ``train.processing`` at settings drawn from ranges (``draw_setting``) that avoid the fixed
   settings the evaluation measures (``processing.EVAL_SETTINGS``). That image is *clean*.
3. **The attack**, on that processed stored image, as an attacker in transit receives it:
   a drawn zoo member (family) through its own resize, a drawn method of
   ``train.attacks.NATIVE_ATTACKS`` and eps, at the native matrix, rounded to 8 bits.
4. Both copies are read back through the runtime's path (exact area resize to 224), so the
   detector trains on what it scores.

Examples are made in chunks of one (family, method, eps, native size) each, seeded per chunk
and cached as ``<work>/zoo/<split>/chunk-NNNN.npz``, so a killed run resumes at the next
chunk. Every example records its family, so a detector can be fitted without some families
(leave-one-family-out evaluation, ``ZooExamples.without``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

# Training settings are drawn from these ranges. The fixed evaluation settings
# (processing.EVAL_SETTINGS) are deliberately outside them where a parameter is discrete
# (CLAHE tiles 8 and 16 are evaluated, 4/6/12 trained) and are measure-zero points of them
# where it is continuous, so the "settings not used in training" figure is honest.
CLAHE_TILES_TRAIN = (4, 6, 12)
PROCESSING_KINDS = ("clahe", "unsharp", "multiscale", "gamma", "lut", "denoise", "jpeg")
ATTACK_STEPS_CAP = 20  # PGD and L2 examples: 20 steps (the evaluation runs the full 40)


@dataclass(frozen=True)
class ZooDraw:
    """What the examples are drawn from (recorded in the bundle manifest)."""

    families: tuple[str, ...]
    attacks: tuple[str, ...] = ("pgd", "fgsm", "mi_fgsm", "di_fgsm", "pgd_l2")
    eps: tuple[float, ...] = (0.002, 0.003, 0.004, 0.006, 0.008)
    native_sizes: tuple[int, ...] = (224, 224, 320, 448, 512, 512, 640)
    processed_share: float = 0.5
    noise_levels: float = 2.0
    chunk: int = 16
    # The storage grid: 255 (8 bits), or 4095 for a 12-bit modality, whose stored image is the
    # 8-bit one lifted (train.attacks.lift_bit_depth) and then processed and attacked at 12 bits
    levels: int = 255

    def settings(self) -> dict[str, Any]:
        """What the cache records; ``levels`` only where it is not 8 bits, so examples made
        before it existed keep their cache."""
        out = asdict(self)
        if self.levels == 255:
            del out["levels"]
        return out


def draw_setting(rng: np.random.Generator) -> Any:
    """One processing setting drawn for training (kind uniform, parameters from ranges), never
    one of the fixed evaluation settings (a rounded draw can land on one: drawn again)."""
    from train.processing import EVAL_SETTINGS

    evaluated = {(e.kind, tuple(sorted(e.params.items()))) for e in EVAL_SETTINGS}
    while True:
        s = _draw_setting(rng)
        if (s.kind, tuple(sorted(s.params.items()))) not in evaluated:
            return s


def _draw_setting(rng: np.random.Generator) -> Any:
    from train.processing import Setting

    kind = PROCESSING_KINDS[int(rng.integers(len(PROCESSING_KINDS)))]
    if kind == "clahe":
        return Setting(kind, {"clip": round(float(rng.uniform(1.0, 5.0)), 2),
                              "tiles": int(rng.choice(CLAHE_TILES_TRAIN))})
    if kind == "unsharp":
        return Setting(kind, {"sigma": round(float(rng.uniform(0.004, 0.05)), 4),
                              "amount": round(float(rng.uniform(0.3, 2.0)), 2)})
    if kind == "multiscale":
        return Setting(kind, {"bands": int(rng.choice((3, 5))),
                              "power": round(float(rng.uniform(0.5, 0.9)), 2),
                              "gain": round(float(rng.uniform(1.1, 2.0)), 2)})
    if kind == "gamma":
        return Setting(kind, {"g": round(float(rng.choice((rng.uniform(0.55, 0.95),
                                                           rng.uniform(1.05, 1.7)))), 3)})
    if kind == "lut":
        return Setting(kind, {"slope": round(float(rng.uniform(4.0, 12.0)), 2),
                              "centre": round(float(rng.uniform(0.4, 0.6)), 3)})
    if kind == "denoise":
        method = str(rng.choice(("bilateral", "nlmeans")))
        strength = rng.uniform(0.01, 0.06) if method == "bilateral" else rng.uniform(0.005, 0.03)
        return Setting(kind, {"method": method, "strength": round(float(strength), 4)})
    return Setting(kind, {"quality": int(rng.integers(75, 99))})


@dataclass(frozen=True)
class ZooExamples:
    """Clean and attacked detector inputs (n, 224, 224) with what made each pair."""

    clean: np.ndarray
    attacked: np.ndarray
    family: np.ndarray  # str per pair
    processed: np.ndarray  # bool per pair: the clean image went through modality processing
    fooled: np.ndarray  # bool per pair: the member's decision flipped
    levels: np.ndarray  # int per pair: the storage grid (255 for 8 bits, 4095 for 12)

    def without(self, families: Sequence[str]) -> ZooExamples:
        """The pairs whose attack came from none of ``families`` (leave-families-out)."""
        keep = ~np.isin(self.family, list(families))
        return ZooExamples(*(getattr(self, f.name)[keep] for f in fields(self)))

    def __add__(self, other: ZooExamples) -> ZooExamples:
        return ZooExamples(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                             for f in fields(self)))

    def __len__(self) -> int:
        return len(self.clean)


@dataclass(frozen=True)
class ChunkPlan:
    family: str
    method: str
    eps: float
    size: int
    rows: np.ndarray  # indices into the split's images


def plan_chunks(n_images: int, count: int, draw: ZooDraw, seed: int) -> list[ChunkPlan]:
    """Which images each chunk attacks and how, seeded (the whole plan, before any work)."""
    rng = np.random.default_rng([seed, 41])
    pick = rng.permutation(n_images)[:count]
    plans = []
    for c, start in enumerate(range(0, len(pick), draw.chunk)):
        r = np.random.default_rng([seed, 43, c])
        plans.append(ChunkPlan(
            family=str(r.choice(draw.families)), method=str(r.choice(draw.attacks)),
            eps=float(r.choice(draw.eps)), size=int(r.choice(draw.native_sizes)),
            rows=np.sort(pick[start:start + draw.chunk])))
    return plans


def make_chunk(plan: ChunkPlan, x224: np.ndarray, member: Any, draw: ZooDraw,
               seed: int) -> dict[str, np.ndarray]:
    """One chunk: stored (and maybe processed) clean images, their attacked copies, both read
    back at 224 through the runtime path."""
    from detector import preprocess
    from train import attacks, zoo

    rng = np.random.default_rng([seed, 47, int(plan.rows[0]) if len(plan.rows) else 0])
    x, kinds = stored_images(plan, x224, draw, rng)
    label = attacks.predicted_class(zoo.predict_logits(member, x))
    a = attacks.NativeAttack(plan.method, plan.eps,
                             steps=(min(ATTACK_STEPS_CAP, attacks.PGD_STEPS)
                                    if plan.method in ("pgd", "pgd_l2") else None))
    adv = attacks.native_attack(member, x, label, a, levels=draw.levels,
                                seed=int(rng.integers(2**31)), batch_size=len(x))
    fooled = attacks.predicted_class(zoo.predict_logits(member, adv)) != label
    return {"clean": preprocess.resize_to_input(x), "attacked": preprocess.resize_to_input(adv),
            "processing": np.array(kinds), "fooled": fooled,
            "levels": np.full(len(x), draw.levels)}


def stored_images(plan: ChunkPlan, x224: np.ndarray, draw: ZooDraw,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """A chunk's clean images as the modality stores them, at the native matrix on the
    ``draw.levels`` grid, and the processing kind of each ("" where none)."""
    from train import attacks
    from train.pipeline import resampled_native

    natives, kinds = [], []
    for i in plan.rows:
        img = (x224[i] if plan.size == 224
               else resampled_native(x224[i], plan.size, rng, draw.noise_levels))
        if draw.levels != 255:
            img = attacks.lift_bit_depth(img, draw.levels, seed=int(rng.integers(2**31)))
        if rng.random() < draw.processed_share:
            setting = draw_setting(rng)
            img = setting.apply(img, draw.levels)
            kinds.append(setting.kind)
        else:
            kinds.append("")
        natives.append(attacks.quantise(img, draw.levels))
    return np.stack(natives).astype(np.float32), kinds


def stage_zoo_examples(work_dir: Path, split_name: str, x224: np.ndarray, count: int,
                       draw: ZooDraw, zoo_work: Path, digest: str, seed: int,
                       log: Any = print) -> ZooExamples:
    """Every chunk of one split, made or loaded from cache; members loaded one at a time."""
    from tqdm import tqdm

    from train import zoo

    root = Path(work_dir) / "zoo" / split_name
    root.mkdir(parents=True, exist_ok=True)
    settings = {**draw.settings(), "count": count, "seed": seed, "members": digest}
    settings_file = root / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != json.loads(
            json.dumps(settings)):
        raise ValueError(f"{root}: its zoo examples were made with other settings; pass a "
                         f"fresh --work directory or delete {root}")
    settings_file.write_text(json.dumps(settings, indent=1))
    plans = plan_chunks(len(x224), count, draw, seed)
    todo = [(c, p) for c, p in enumerate(plans) if not (root / f"chunk-{c:04d}.npz").is_file()]
    if todo:
        log(f"zoo examples {split_name}: {len(todo)} of {len(plans)} chunks to make")
    loaded: dict[str, Any] = {}
    # family-major order, so each member is loaded once
    for c, p in tqdm(sorted(todo, key=lambda cp: (cp[1].family, cp[0])),
                     desc=f"zoo examples {split_name}", unit="chunk", mininterval=10):
        if p.family not in loaded:
            loaded.clear()
            loaded[p.family] = zoo.load_member(zoo_work, p.family, seed=0, digest=digest)[0]
        out = make_chunk(p, x224, loaded[p.family], draw, seed * 1000 + c)
        path = root / f"chunk-{c:04d}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, family=np.array([p.family] * len(p.rows)),
                 method=np.array([p.method] * len(p.rows)), eps=np.full(len(p.rows), p.eps),
                 size=np.full(len(p.rows), p.size), **out)
        os.replace(tmp, path)
    return load_examples(root, len(plans))


def load_examples(root: Path, n_chunks: int) -> ZooExamples:
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("clean", "attacked", "family", "processing", "fooled", "levels")}
    for c in range(n_chunks):
        with np.load(root / f"chunk-{c:04d}.npz") as z:
            for k in parts:
                # chunks made before the 12-bit draw carry no levels: they are 8-bit
                parts[k].append(z[k] if k in z.files else np.full(len(z["fooled"]), 255))
    if not n_chunks:
        empty = np.empty((0, 224, 224), np.float32)
        return ZooExamples(empty, empty, np.array([], str), np.array([], bool),
                           np.array([], bool), np.array([], int))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return ZooExamples(cat["clean"].astype(np.float32), cat["attacked"].astype(np.float32),
                       cat["family"], cat["processing"] != "", cat["fooled"].astype(bool),
                       cat["levels"].astype(int))


def ensure_members(zoo_work: Path, families: Sequence[str], digest: str, x: dict[str, np.ndarray],
                   y: dict[str, np.ndarray], epochs: int | None, log: Any = print) -> list[dict]:
    """Every member of ``families`` trained on this split (``x`` in [0, 1] at 224, per split
    part), or loaded from the zoo cache; returns their meta (test AUC, wall time)."""
    from train import zoo

    data = zoo.KermanyArrays({k: np.round(v * 255.0).astype(np.uint8) for k, v in x.items()},
                             dict(y), digest)
    return [zoo.ensure_member(zoo_work, f, data, epochs=epochs, log=log) for f in families]
