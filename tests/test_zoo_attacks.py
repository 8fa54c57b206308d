"""Native-matrix attacks through a victim's own preprocessing (issue 15), on tiny models.

No data and no training: a tiny network whose first layer is a zoo pipeline (a resize from any
native matrix to its input size). What must hold for every attack an attacker would use: the
stored result is exactly on the storage grid, L-inf attacks move no stored value by more than
round(eps * levels), the native matrix is kept, and the victim's margin for its own prediction
goes down.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from train import attacks, zoo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_victim(size: int = 32, method: str = "bilinear", antialias: bool = False,
                seed: int = 0) -> keras.Model:
    """Native image (any matrix) -> its pipeline's resize -> conv -> logit; random weights."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 1))
    x = zoo.pipeline_layer(zoo.Pipeline(size, method, antialias))(inp)
    x = keras.layers.Reshape((size, size, 1))(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(1)(x))


def images(n: int, rows: int, cols: int, levels: int, seed: int = 1) -> np.ndarray:
    """Smooth fields plus noise, already on the storage grid k / levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    base = 0.5 + 0.3 * np.sin(6 * xx)[None] * np.cos(4 * yy)[None]
    x = base + 0.05 * rng.standard_normal((n, rows, cols))
    return attacks.quantise(x, levels)


def stored(x: np.ndarray, levels: int) -> np.ndarray:
    return np.round(x.astype(np.float64) * levels).astype(np.int64)


@pytest.mark.parametrize("method", ["pgd", "fgsm", "mi_fgsm", "di_fgsm"])
@pytest.mark.parametrize("levels", [255, 4095])
def test_linf_attacks_stay_within_eps_on_the_storage_grid(method: str, levels: int) -> None:
    victim = tiny_victim()
    x = images(3, 80, 72, levels)
    y = attacks.predicted_class(zoo.predict_logits(victim, x))
    eps = 0.006
    a = attacks.NativeAttack(method, eps, steps=None if method == "fgsm" else 4)
    adv = attacks.native_attack(victim, x, y, a, levels=levels, seed=0)
    assert adv.shape == x.shape  # the native matrix, not the victim's input size
    assert adv.dtype == np.float32
    # exactly on the grid k / levels: quantising again changes nothing
    assert np.array_equal(attacks.quantise(adv, levels), adv)
    change = np.abs(stored(adv, levels) - stored(x, levels))
    assert change.max() <= round(eps * levels)
    assert change.max() >= 1  # it did move stored values
    assert adv.min() >= 0.0 and adv.max() <= 1.0


@pytest.mark.parametrize("method", ["pgd", "fgsm", "mi_fgsm", "di_fgsm", "pgd_l2"])
def test_attack_lowers_the_victims_margin_through_its_resize(method: str) -> None:
    victim = tiny_victim(size=24, method="bicubic", antialias=True)
    x = images(4, 96, 96, 255, seed=3)
    logits = zoo.predict_logits(victim, x)
    y = attacks.predicted_class(logits)
    a = attacks.NativeAttack(method, 0.03, steps=None if method == "fgsm" else 5)
    adv = attacks.native_attack(victim, x, y, a, levels=255, seed=0)
    before = attacks.victim_margin(logits, y)
    after = attacks.victim_margin(zoo.predict_logits(victim, adv), y)
    assert np.all(after < before), (before, after)


def test_l2_attack_respects_its_budget_before_rounding() -> None:
    victim = tiny_victim()
    x = images(2, 64, 64, 255)
    y = attacks.predicted_class(zoo.predict_logits(victim, x))
    a = attacks.NativeAttack("pgd_l2", 0.004, steps=6)
    raw = attacks._attack_batch(victim, x, y, a, np.random.default_rng(0))
    norm = np.sqrt(((raw - x) ** 2).reshape(len(x), -1).sum(axis=1))
    assert np.all(norm <= 0.004 * 64 + 1e-4)
    assert np.all(norm > 0.5 * 0.004 * 64)  # it spends the budget


def test_pgd_random_start_is_seeded() -> None:
    victim = tiny_victim()
    x = images(2, 48, 48, 255)
    y = attacks.predicted_class(zoo.predict_logits(victim, x))
    a = attacks.NativeAttack("pgd", 0.006, steps=2)
    one = attacks.native_attack(victim, x, y, a, levels=255, seed=7)
    two = attacks.native_attack(victim, x, y, a, levels=255, seed=7)
    other = attacks.native_attack(victim, x, y, a, levels=255, seed=8)
    assert np.array_equal(one, two)
    assert not np.array_equal(one, other)


def test_area_pipeline_is_the_runtimes_exact_area_resize() -> None:
    """The zoo's differentiable area resize is detector.preprocess's (to float32 rounding), so
    a victim with the '224-area' pipeline reads a stored image exactly as the runtime does."""
    from detector import preprocess

    x = images(1, 512, 437, 255)
    ours = zoo.resize_tf(tf.constant(x[..., None]), zoo.Pipeline(224, "area")).numpy()[..., 0]
    runtime = preprocess.resize_to_input(x)
    assert np.abs(ours - runtime).max() < 2e-6


def test_area_pipeline_has_a_gradient() -> None:
    """tf.image.resize(method='area') has none; the zoo's own does."""
    x = tf.constant(images(1, 100, 90, 255)[..., None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(zoo.resize_tf(x, zoo.Pipeline(32, "area")) ** 2)
    g = tape.gradient(y, x)
    assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0


def test_multiclass_margin_and_loss() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    assert np.allclose(attacks.victim_margin(logits, np.array([0, 2])), [1.5, -2.0])
    assert list(attacks.predicted_class(logits)) == [0, 1]
    loss = attacks.attack_loss(tf.constant(logits, tf.float32), tf.constant([0, 1]))
    assert loss.shape == (2,)


def test_pipeline_tags_round_trip_and_errors_name_the_fix() -> None:
    for tag in ("224-bilinear", "256-bicubic-aa", "320-area"):
        assert zoo.Pipeline.parse(tag).tag == tag
    with pytest.raises(ValueError, match="SIZE-METHOD"):
        zoo.Pipeline.parse("224-lanczos")
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.NativeAttack("cw", 0.003)


def test_every_family_builds_and_reads_any_native_matrix() -> None:
    """Each zoo family is a model from the native matrix to one logit, at its own input size."""
    for name, fam in zoo.FAMILIES.items():
        model = zoo.build_member(name)
        for rows, cols in ((224, 224), (300, 260)):
            out = model(np.zeros((1, rows, cols, 1), np.float32))
            assert tuple(out.shape) == (1, 1), name
        assert model.get_layer("pipeline").pipeline == fam.pipeline
    assert len(zoo.FAMILIES) >= 8


# ----------------------------------------------------------------------------- sentinel attack


def site_model(path, size: int = 32, channels: int = 1, activation: str | None = None):
    """A site's own classifier, saved as a plain Keras file (no zoo layer inside)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, channels))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation=activation)(x)
    model = keras.Model(inp, out)
    model.save(path)
    return path


def test_cli_victim_attacks_the_native_matrix_and_keeps_the_encoding(tmp_path) -> None:
    """`sentinel attack --victim site.keras --input-size 32 --resize area`: a synthetic 12-bit
    CR is attacked at its 200x180 matrix through the model's own resize; the copy keeps bit
    depth, photometric interpretation and syntax, moves no stored value by more than
    round(eps * 4095), and the model's margin for its own prediction goes down."""
    import pydicom

    from gateway.cli import main
    from tests import dicom_factory

    src = dicom_factory.synthetic(tmp_path / "in.dcm", rows=200, cols=180, bits_stored=12)
    model = site_model(tmp_path / "site.keras", channels=3, activation="sigmoid")
    rc = main(["attack", str(src), str(tmp_path / "out.dcm"), "--victim", str(model),
               "--input-size", "32", "--resize", "area", "--eps", "0.01", "--method", "pgd"])
    assert rc == 0
    a, b = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "out.dcm")
    assert b.pixel_array.shape == a.pixel_array.shape == (200, 180)
    assert b.BitsStored == 12 and b.PhotometricInterpretation == a.PhotometricInterpretation
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert b.SOPInstanceUID != a.SOPInstanceUID
    change = np.abs(b.pixel_array.astype(int) - a.pixel_array.astype(int))
    assert 1 <= change.max() <= round(0.01 * 4095)

    from train import dicom_attack

    victim = dicom_attack.load_site_victim(model, zoo.Pipeline(32, "area"))
    assert victim.probability and victim.channels == 3
    from detector import preprocess

    x0, x1 = (preprocess.dataset_to_unit(d)[..., None] for d in (a, b))
    z0, z1 = (float(np.asarray(victim(x)).reshape(-1)[0]) for x in (x0, x1))
    assert np.sign(z0) * (z1 - z0) < 0


def test_cli_victim_rle_copy_and_bad_inputs_name_the_fix(tmp_path, capsys) -> None:
    import pydicom
    from pydicom.uid import RLELossless

    from gateway.cli import main
    from tests import dicom_factory

    src = dicom_factory.synthetic(tmp_path / "in.dcm", rows=96, cols=96, bits_stored=10)
    ds = pydicom.dcmread(src)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    model = site_model(tmp_path / "site.h5", size=48)
    rc = main(["attack", str(tmp_path / "rle.dcm"), str(tmp_path / "o.dcm"), "--victim",
               str(model), "--input-size", "48", "--resize", "bicubic", "--antialias",
               "--method", "mi-fgsm"])
    assert rc == 0
    assert pydicom.dcmread(tmp_path / "o.dcm").file_meta.TransferSyntaxUID == RLELossless
    # wrong input size, a perturbation that is no gradient attack, a native method without
    # a victim: each refused with the fix
    assert main(["attack", str(src), str(tmp_path / "x.dcm"), "--victim", str(model),
                 "--input-size", "64"]) == 2
    assert "--input-size 48" in capsys.readouterr().err
    assert main(["attack", str(src), str(tmp_path / "x.dcm"), "--victim", str(model),
                 "--input-size", "48", "--method", "gaussian"]) == 2
    assert "gradient attack" in capsys.readouterr().err
    assert main(["attack", str(src), str(tmp_path / "x.dcm"), "--method", "di-fgsm"]) == 2
    assert "--victim MODEL" in capsys.readouterr().err
    assert not (tmp_path / "x.dcm").exists()


def test_cli_native_method_names_match_the_attacks() -> None:
    from train import cmd_attack

    assert tuple(m.replace("-", "_") for m in cmd_attack.NATIVE) == attacks.NATIVE_ATTACKS
    assert cmd_attack.RESIZES == zoo.RESIZE_METHODS


def test_a_saved_zoo_member_loads_as_a_site_victim(tmp_path) -> None:
    """A model whose first layer is a zoo pipeline, saved with model.save(), is a --victim in a
    fresh process (it failed with "Could not locate class 'PipelineResize'" before the layer
    was registered on load)."""
    import subprocess
    import sys

    model = tiny_victim()
    model.save(tmp_path / "member.keras")
    x = images(1, 64, 64, 255)
    np.save(tmp_path / "x.npy", x)
    want = zoo.predict_logits(model, zoo.resize_tf(
        tf.constant(x[..., None]), zoo.Pipeline(32, "area")).numpy()[..., 0])
    code = ("import sys, numpy as np; from train import dicom_attack, zoo; "
            "v = dicom_attack.load_site_victim(sys.argv[1], zoo.Pipeline(32, 'area')); "
            "x = np.load(sys.argv[2]); print(float(np.asarray(v(x[..., None])).reshape(-1)[0]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "member.keras"),
                        str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert abs(float(r.stdout.strip().splitlines()[-1]) - float(want[0])) < 1e-4


def test_cli_victim_takes_a_savedmodel_with_class_scores(tmp_path) -> None:
    """A SavedModel directory answering two class logits: the attack lowers the margin of the
    predicted class over the other, at the native matrix, within eps in stored levels."""
    import pydicom

    from gateway.cli import main
    from tests import dicom_factory

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(2)(x)).export(str(tmp_path / "sm"), verbose=False)
    src = dicom_factory.synthetic(tmp_path / "in.dcm", rows=100, cols=90, bits_stored=12)
    rc = main(["attack", str(src), str(tmp_path / "out.dcm"), "--victim", str(tmp_path / "sm"),
               "--input-size", "32", "--method", "pgd-l2", "--eps", "0.02"])
    assert rc == 0
    a, b = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "out.dcm")
    assert b.pixel_array.shape == (100, 90) and b.BitsStored == 12
    assert np.any(a.pixel_array != b.pixel_array)
    from train import dicom_attack

    victim = dicom_attack.load_site_victim(tmp_path / "sm", zoo.Pipeline(32, "bilinear"))
    from detector import preprocess

    z0, z1 = (np.asarray(victim(preprocess.dataset_to_unit(d)[..., None])) for d in (a, b))
    label = attacks.predicted_class(z0)
    assert attacks.victim_margin(z1, label)[0] < attacks.victim_margin(z0, label)[0]
