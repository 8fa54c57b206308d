"""Secret site bundles (issue 19, train.secret): the draws, the secret file's handling, and a
bundle whose forest reads a drawn subset of the features in a drawn order, loaded and scored by
the runtime. The whole `sentinel train --secret-file` path is the slow test at the end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from detector.bundle import forest_columns, load_manifest, write_bundle
from detector.errors import BundleError
from detector.features import FEATURE_NAMES, FEATURE_SET, extract_batch
from detector.forest import ForestArrays
from detector.scoring import Detector
from train import secret
from train.detector_cnn import CNN_SHAPES, CNN_TRUNCS

ZOO = ("strided", "maxpool", "avgpool", "residual", "blurpool", "depthwise", "patchify", "vit")
KEY_A = bytes.fromhex("6a" * 32)
KEY_B = bytes.fromhex("6b" * 32)


def _choices(d: secret.SecretDraws) -> dict:
    rec = d.manifest_record()
    return {k: v for k, v in rec.items() if k not in ("salt", "digest")}


def test_same_secret_same_draws_other_secret_other_draws() -> None:
    a1 = secret.draw(KEY_A, FEATURE_SET, ZOO)
    a2 = secret.draw(KEY_A, FEATURE_SET, ZOO)
    b = secret.draw(KEY_B, FEATURE_SET, ZOO)
    assert _choices(a1) == _choices(a2) and a1.tag == a2.tag
    assert a1.salt != a2.salt and a1.digest != a2.digest  # fresh salt per bundle
    assert _choices(a1) != _choices(b) and a1.tag != b.tag
    # every draw moves with the secret: over 40 secrets each choice takes several values
    many = [secret.draw(bytes([i]) * 32, FEATURE_SET, ZOO) for i in range(40)]
    for k in ("cnn_filters", "cnn_width", "cnn_trunc", "cnn_seed", "forest_seed",
              "feature_names", "zoo_families"):
        assert len({json.dumps(getattr(d, k)) for d in many}) > 1, k
    for d in many:
        assert (d.cnn_filters, d.cnn_width, d.cnn_kernel) in CNN_SHAPES
        assert d.cnn_trunc in CNN_TRUNCS
        assert len(d.feature_names) == len(set(d.feature_names)) >= 7
        assert set(d.feature_names) <= set(FEATURE_NAMES)
        assert secret.MIN_ZOO_FAMILIES <= len(d.zoo_families) <= len(ZOO)
    assert secret.draw(KEY_A, FEATURE_SET).zoo_families == ()  # without the zoo


def test_shapes_over_the_latency_budget_are_redrawn_and_the_rest_kept() -> None:
    """The first scheme drew from CNN_SHAPES_V1; a secret whose first draw is still allowed
    keeps that shape, one whose draw left (8 filters, 5x5 kernels) draws again."""
    from train.detector_cnn import CNN_SHAPES_V1

    assert set(CNN_SHAPES) < set(CNN_SHAPES_V1)
    assert all(f <= 6 and k == 3 for f, _, k in CNN_SHAPES)
    kept = redrawn = 0
    for i in range(60):
        key = bytes([i + 1]) * 32
        first = CNN_SHAPES_V1[int(secret._rng(key, "cnn-shape").integers(len(CNN_SHAPES_V1)))]
        d = secret.draw(key, FEATURE_SET)
        got = (d.cnn_filters, d.cnn_width, d.cnn_kernel)
        assert got in CNN_SHAPES
        if first in CNN_SHAPES:
            assert got == first
            kept += 1
        else:
            redrawn += 1
    assert kept and redrawn  # both cases were exercised


def test_digest_identifies_the_secret_without_holding_it() -> None:
    d = secret.draw(KEY_A, FEATURE_SET, ZOO)
    rec = d.manifest_record()
    assert secret.matches_digest(KEY_A, rec) and not secret.matches_digest(KEY_B, rec)
    assert KEY_A.hex() not in json.dumps(rec) and "6a6a" not in json.dumps(rec)


def test_secret_file_mode_length_and_no_overwrite(tmp_path: Path) -> None:
    p = secret.new_secret_file(tmp_path / "site.key")
    assert (p.stat().st_mode & 0o777) == 0o600
    site = secret.read_secret(p)
    assert site.draw_scheme == secret.CURRENT_DRAW_SCHEME == 2
    assert len(site.key) == 64 and site.key == p.read_bytes().strip().splitlines()[-1]
    with pytest.raises(secret.SecretError, match="never overwritten"):
        secret.new_secret_file(p)
    os.chmod(p, 0o644)
    with pytest.raises(secret.SecretError, match="chmod 600"):
        secret.read_secret(p)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(secret.SecretError, match="fewer than"):
        secret.read_secret(short)
    with pytest.raises(secret.SecretError, match="does not exist"):
        secret.read_secret(tmp_path / "missing.key")


V1_FEATURES_OF_KEY_A = (  # what scheme 1 drew for KEY_A before schemes were recorded
    "spectral_entropy", "intensity_std", "skewness", "residual_std_ratio",
    "near_zero_diff_frac", "laplacian_var", "noise_sigma", "kurtosis", "diff_lag1_corr",
    "residual_kurtosis")


def test_a_secret_file_without_header_still_makes_its_old_bundle(tmp_path: Path) -> None:
    """Files written before draw schemes (one hex line) are scheme 1 and draw what they drew
    then, so a site can remake an existing bundle from its secret."""
    old = tmp_path / "old.key"
    old.write_text("6a" * 32 + "\n")
    os.chmod(old, 0o600)
    site = secret.read_secret(old)
    assert site == secret.SiteSecret(("6a" * 32).encode(), 1)
    d = secret.draw(secret.SiteSecret(KEY_A, 1), FEATURE_SET, ZOO, salt=b"0" * 16)
    assert d.feature_names == V1_FEATURES_OF_KEY_A and d.draw_scheme == 1
    assert (d.tag, d.cnn_seed, d.forest_seed) == ("f69ecdf6e2", 1138429340, 611791810)
    assert _choices(d) == {**_choices(secret.draw(KEY_A, FEATURE_SET, ZOO)), "draw_scheme": 1}


def test_scheme_2_never_draws_noise_sigma_and_always_the_noise_shape_features() -> None:
    """Scheme 2 changes the forest's features only: the CNN, seeds and zoo families of a
    secret are the same in both schemes."""
    positions, subsets = set(), set()
    always = {"near_zero_diff_frac", "residual_std_ratio", "residual_kurtosis"}
    for i in range(60):
        key = bytes([i + 1]) * 32
        d1 = secret.draw(secret.SiteSecret(key, 1), FEATURE_SET, ZOO)
        d2 = secret.draw(secret.SiteSecret(key, 2), FEATURE_SET, ZOO)
        assert "noise_sigma" not in d2.feature_names
        assert always <= set(d2.feature_names)
        positions.add(d2.feature_names.index("near_zero_diff_frac"))
        subsets.add(frozenset(d2.feature_names))
        assert 8 <= len(d2.feature_names) == len(set(d2.feature_names)) <= 10
        same = ("cnn_filters", "cnn_width", "cnn_kernel", "cnn_trunc", "cnn_seed",
                "forest_seed", "zoo_families")
        assert [getattr(d1, k) for k in same] == [getattr(d2, k) for k in same]
        assert d2.draw_scheme == 2
        assert (d2.tag == d1.tag) == (d2.feature_names == d1.feature_names)
    assert len(positions) > 3  # their places in the order are drawn too
    assert len(subsets) > 10  # and which of the other seven are kept


def test_a_secret_file_naming_an_unknown_scheme_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "future.key"
    p.write_text("xray-sentinel site secret, draw scheme 9\n" + "ab" * 32 + "\n")
    os.chmod(p, 0o600)
    with pytest.raises(secret.SecretError, match=r"draw scheme '9'.*known: \[1, 2\]"):
        secret.read_secret(p)


def _synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    x = np.empty((n, 224, 224), np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        img = 0.5 + 0.2 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform() * yy))
        img = np.round(np.clip(img, 0, 1) * 255)
        if y[i]:
            img = np.clip(img + rng.choice([-1.0, 1.0], img.shape), 0, 255)
        x[i] = img / 255.0
    return x, y


def _largest_cnn_tflite(tmp_path: Path, shape: tuple[int, int, int]) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from train import detector_cnn

    f, w, k = shape
    model = detector_cnn.build_shipped(filters=f, width=w, kernel=k, trunc=2.0)
    return detector_cnn.export_tflite(model, tmp_path / f"cnn-{f}-{w}-{k}.tflite")


def _secret_bundle(tmp_path: Path, draws: secret.SecretDraws, cnn: Path) -> Path:
    """A bundle as run_pipeline writes a secret one: forest on the drawn columns, the draws in
    training_data.config.secret, the card's section as its model card."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = _synthetic(40)
    cols = secret.feature_columns(draws, FEATURE_SET)
    feats = extract_batch(x, FEATURE_SET)[:, cols]
    rf = RandomForestClassifier(n_estimators=15, random_state=draws.forest_seed).fit(feats, y)
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(draws.card_markdown(FEATURE_SET))
    return write_bundle(
        tmp_path / "bundle", cnn_tflite=cnn, forest=ForestArrays.from_sklearn(rf),
        feature_names=draws.feature_names, feature_set=FEATURE_SET, w_cnn=0.5, threshold=0.5,
        thresholds={}, training_data={"config": {"secret": draws.manifest_record()}},
        metrics={}, extra_files={"model_card": card})


def test_secret_bundle_loads_scores_and_never_holds_the_secret(tmp_path: Path) -> None:
    shapes = sorted(CNN_SHAPES, key=lambda s: s[0] * s[1] * s[2] ** 2)
    draws = secret.draw(KEY_A, FEATURE_SET, ZOO)
    bdir = _secret_bundle(tmp_path, draws, _largest_cnn_tflite(tmp_path, shapes[-1]))
    man = load_manifest(bdir)
    assert man.feature_names == draws.feature_names
    det = Detector.load(bdir, num_threads=1)
    x, _ = _synthetic(6, seed=3)
    cols = np.asarray(forest_columns(draws.feature_names, FEATURE_SET))
    # the forest is fed the drawn columns in the drawn order, not the vector's first columns
    want = det.forest.predict_proba(extract_batch(x, FEATURE_SET)[:, cols])
    got = np.array([det.score_unit(img)[1] for img in x])
    np.testing.assert_allclose(got, want, atol=1e-12)
    # the secret is in no byte of the bundle, in any spelling; its salted digest is
    for p in bdir.iterdir():
        raw = p.read_bytes()
        for needle in (KEY_A, KEY_A.hex().encode(), KEY_A.hex().upper().encode()):
            assert needle not in raw, p.name
    card = (bdir / "MODEL_CARD.md").read_text()
    assert draws.digest in card and ", ".join(draws.feature_names) in card
    assert secret.matches_digest(KEY_A, man.training_data["config"]["secret"])


def test_runtime_refuses_feature_names_that_are_not_distinct_members(tmp_path: Path) -> None:
    assert forest_columns(("noise_sigma", "noise_sigma"), FEATURE_SET) is None
    assert forest_columns(("no_such_feature",), FEATURE_SET) is None
    assert forest_columns(FEATURE_NAMES[::-1], FEATURE_SET) == tuple(range(10, -1, -1))
    bad = write_bundle(tmp_path / "b", cnn_tflite=_largest_cnn_tflite(tmp_path, CNN_SHAPES[0]),
                       forest=_tiny_forest(2), feature_names=("noise_sigma", "noise_sigma"),
                       feature_set=FEATURE_SET, w_cnn=0.5, threshold=0.5, thresholds={},
                       training_data={}, metrics={})
    with pytest.raises(BundleError, match="feature_names"):
        Detector.load(bad)
    # a manifest edited to list an unknown feature is refused at load (digests fixed up)
    draws = secret.draw(KEY_B, FEATURE_SET)
    bdir = _secret_bundle(tmp_path, draws, _largest_cnn_tflite(tmp_path, CNN_SHAPES[0]))
    from detector.bundle import write_manifest

    doc = json.loads((bdir / "manifest.json").read_text())
    doc["feature_names"][0] = "no_such_feature"
    write_manifest(bdir, doc)
    with pytest.raises(BundleError, match="feature_names"):
        Detector.load(bdir)


def _tiny_forest(n_features: int) -> ForestArrays:
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, n_features))
    return ForestArrays.from_sklearn(
        RandomForestClassifier(n_estimators=2, random_state=0).fit(x, np.arange(20) % 2))


def test_largest_family_members_keep_the_latency_budget(tmp_path: Path) -> None:
    """The family's costliest shape against the shipped shape (filters 4, width 12, 3x3),
    timed interleaved in one run at one thread (these machines are shared: a ratio, not a
    time). The shipped bundle takes 1.56 ms of the 2.0 ms budget, its CNN 1.0 ms of that, so
    the costliest member may cost at most 2.0 / 1.56 = 1.28x the shipped shape; the guard is
    looser for noise and bench/detector_latency.py gives the reported figure."""
    x, _ = _synthetic(4, seed=5)
    biggest = max(CNN_SHAPES, key=lambda s: s[0] * s[1] * s[2] ** 2 + s[1] * s[1] * s[2] ** 2)
    dets = []
    for shape in ((4, 12, 3), biggest):
        sub = tmp_path / "-".join(map(str, shape))
        sub.mkdir()
        draws = secret.draw(KEY_A, FEATURE_SET)
        dets.append(Detector.load(_secret_bundle(sub, draws, _largest_cnn_tflite(sub, shape)),
                                  num_threads=1))
    for det in dets:
        for img in x:
            det.score_unit(img)
    times: list[list[float]] = [[], []]
    for i in range(300):
        for j, det in enumerate(dets):
            t0 = time.perf_counter()
            det.score_unit(x[i % 4])
            times[j].append(time.perf_counter() - t0)
    ratio = float(np.median(times[1]) / np.median(times[0]))
    assert ratio < 1.6, (biggest, ratio)


@pytest.mark.slow
def test_train_quick_with_secret_file(tmp_path: Path) -> None:
    """`sentinel train --quick --new-secret --secret-file`: the bundle loads and scores, records
    the digest and the draws, and no byte of it or its training bundle holds the secret; a
    second secret draws other choices; the same secret reuses the trained models."""
    from test_train_e2e import _folder

    from gateway.cli import main

    data, key, key2 = tmp_path / "data", tmp_path / "a.key", tmp_path / "b.key"
    _folder(data)
    args = ["train", "--data", str(data), "--work", str(tmp_path / "work"), "--quick",
            "--no-zoo"]
    assert main([*args, "--out", str(tmp_path / "a"), "--secret-file", str(key),
                 "--new-secret"]) == 0
    assert main([*args, "--out", str(tmp_path / "a"), "--secret-file", str(key),
                 "--new-secret"]) == 2  # never overwrites a secret
    site = secret.read_secret(key)
    k = site.key
    man = load_manifest(tmp_path / "a")
    rec = man.training_data["config"]["secret"]
    assert secret.matches_digest(k, rec)
    assert tuple(man.feature_names) == tuple(rec["feature_names"])
    # a new secret is drawn by the current scheme, recorded in the manifest and the card
    assert rec["draw_scheme"] == site.draw_scheme == secret.CURRENT_DRAW_SCHEME
    assert "noise_sigma" not in man.feature_names
    assert f"| draw scheme | {site.draw_scheme}: " in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    det = Detector.load(tmp_path / "a")
    assert 0.0 <= det.score_path(data / "img/000.png").score <= 1.0
    for d in (tmp_path / "a", tmp_path / "a-training"):
        for p in d.iterdir():
            raw = p.read_bytes()
            assert k not in raw and k.lower() not in raw and k.upper() not in raw, p
    cnn_files = sorted((tmp_path / "work" / "models").glob("cnn-secret-*.tflite"))
    assert len(cnn_files) == 1
    secret.new_secret_file(key2)
    assert main([*args, "--out", str(tmp_path / "b"), "--secret-file", str(key2)]) == 0
    rec2 = load_manifest(tmp_path / "b").training_data["config"]["secret"]
    assert {k: v for k, v in rec2.items() if k not in ("salt", "digest")} != {
        k: v for k, v in rec.items() if k not in ("salt", "digest")}
    assert len(sorted((tmp_path / "work" / "models").glob("cnn-secret-*.tflite"))) == 2
    mtime = cnn_files[0].stat().st_mtime
    assert main([*args, "--out", str(tmp_path / "a2"), "--secret-file", str(key)]) == 0
    assert cnn_files[0].stat().st_mtime == mtime  # resumed: the same draws, the same model
