"""Preprocessing: normalisation by bit depth, DICOM variants, transfer syntaxes, hostile input.

Every DICOM here is made at test time in tmp_path (never committed). Compressed copies come
from pydicom's own encoders (RLE, deflate, JPEG 2000 via openjpeg) and from DCMTK's
dcmcjpeg / dcmcjpls where installed (those tests skip with a message otherwise).
"""

from __future__ import annotations

import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from detector.errors import (
    ColourImage,
    MatrixTooLarge,
    NoPixelData,
    PixelDataLengthMismatch,
    PreprocessError,
    Unreadable,
    UnsupportedTransferSyntax,
)
from detector.preprocess import (
    INPUT_SIZE,
    dataset_to_unit,
    image_to_unit,
    load_unit,
    preprocess_dataset,
    preprocess_path,
    read_dicom,
    resize_frame,
    resize_to_input,
    stored_to_unit,
)

CR = "1.2.840.10008.5.1.4.1.1.1"


def make_ds(
    pixels: np.ndarray,
    *,
    bits_stored: int,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    ts: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A minimal CR dataset around ``pixels`` ((rows, cols) or (frames, rows, cols))."""
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    rows, cols = pixels.shape[-2:]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    dtype = {
        (8, False): np.uint8,
        (8, True): np.int8,
        (16, False): np.uint16,
        (16, True): np.int16,
    }[(ds.BitsAllocated, signed)]
    ds.PixelData = pixels.astype(dtype).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 64, cols: int = 48, bits: int = 12, signed: bool = False) -> np.ndarray:
    """Values covering the whole stored range, so normalisation end points are exercised."""
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return np.linspace(lo, hi, rows * cols).round().astype(np.int64).reshape(rows, cols)


# ----------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 15, 16])
@pytest.mark.parametrize("signed", [False, True])
def test_normalisation_maps_stored_range_to_unit(tmp_path: Path, bits: int, signed: bool) -> None:
    px = ramp(bits=bits, signed=signed)
    unit = load_unit(save(make_ds(px, bits_stored=bits, signed=signed), tmp_path / "a.dcm"))
    lo = -(1 << (bits - 1)) if signed else 0
    expected = (px - lo) / ((1 << bits) - 1)
    assert unit.shape == (1, *px.shape) and unit.dtype == np.float32
    np.testing.assert_allclose(unit[0], expected, atol=1e-7)
    assert unit.min() == 0.0 and unit.max() == 1.0


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    px = ramp(bits=10)
    m2 = load_unit(save(make_ds(px, bits_stored=10), tmp_path / "m2.dcm"))
    m1 = load_unit(
        save(make_ds(px, bits_stored=10, photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    )
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-7)
    assert m1[0, 0, 0] == 1.0  # stored 0 is white in MONOCHROME1


def test_nema_monochrome1_inverted(nema_dir: Path) -> None:
    """RG3 (10-bit MONOCHROME1): our value is 1 - stored/1023 for every pixel."""
    ds = read_dicom(nema_dir / "RG3_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = pydicom.dcmread(nema_dir / "RG3_UNCR.dcm").pixel_array.astype(np.float64)
    unit = dataset_to_unit(ds)[0]
    np.testing.assert_allclose(unit, 1.0 - raw / 1023.0, atol=1e-6)


def test_negative_rescale_slope_flips_and_intercept_cancels(tmp_path: Path) -> None:
    px = ramp(bits=12)
    base = load_unit(save(make_ds(px, bits_stored=12), tmp_path / "b.dcm"))
    pos = load_unit(
        save(make_ds(px, bits_stored=12, slope=2.0, intercept=-1024), tmp_path / "p.dcm")
    )
    neg = load_unit(
        save(make_ds(px, bits_stored=12, slope=-1.0, intercept=4095), tmp_path / "n.dcm")
    )
    np.testing.assert_allclose(pos, base, atol=1e-7)
    np.testing.assert_allclose(neg, 1.0 - base, atol=1e-7)


def test_bits_above_bits_stored_are_ignored() -> None:
    """Garbage in the unused high bits (old overlays) must not change the image."""
    frame = np.array([[0x0FFF, 0xF000 | 0x0800, 0x1001]], dtype=np.uint16)
    unit = stored_to_unit(frame, bits_stored=12, signed=False, invert=False)
    np.testing.assert_allclose(unit[0], [1.0, 0x800 / 4095, 1 / 4095])
    signed = stored_to_unit(
        np.array([[0xF800]], dtype=np.uint16), bits_stored=12, signed=True, invert=False
    )
    assert signed[0, 0] == pytest.approx(0.0)  # 0x800 in 12 bits is -2048, the minimum


def test_multiframe_every_frame(tmp_path: Path) -> None:
    px = np.stack([ramp(bits=12), 4095 - ramp(bits=12), np.full((64, 48), 2048)])
    path = save(make_ds(px, bits_stored=12), tmp_path / "mf.dcm")
    out = preprocess_path(path)
    assert out.shape == (3, INPUT_SIZE, INPUT_SIZE)
    np.testing.assert_allclose(out[1], 1.0 - out[0], atol=1e-6)
    np.testing.assert_allclose(out[2], 2048 / 4095, atol=1e-6)


# ----------------------------------------------------------------------- transfer syntaxes


def _reference(tmp_path: Path, bits: int = 12) -> tuple[np.ndarray, Path]:
    rng = np.random.default_rng(1)
    px = rng.integers(0, 1 << bits, size=(70, 90)).astype(np.int64)
    px[:10] = np.arange(90) * ((1 << bits) - 1) // 89  # smooth rows too
    return px, save(make_ds(px, bits_stored=bits), tmp_path / "ref.dcm")


def test_uncompressed_syntaxes_agree(tmp_path: Path) -> None:
    px, ref = _reference(tmp_path)
    expected = load_unit(ref)
    for ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        ds = make_ds(px, bits_stored=12, ts=ts)
        path = tmp_path / f"{ts.name}.dcm"
        try:
            ds.save_as(
                path,
                enforce_file_format=True,
                implicit_vr=ts.is_implicit_VR,
                little_endian=ts.is_little_endian,
            )
        except Exception as exc:  # pragma: no cover - depends on pydicom's writer
            pytest.skip(f"pydicom cannot write {ts.name}: {exc}")
        if not ts.is_little_endian:
            # the bytes were written little-endian by tobytes(); rewrite them big-endian
            raw = pydicom.dcmread(path)
            raw.PixelData = px.astype(">u2").tobytes()
            raw.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=False)
        np.testing.assert_array_equal(load_unit(path), expected, err_msg=ts.name)


def test_rle_and_deflate_round_trip(tmp_path: Path) -> None:
    _px, ref = _reference(tmp_path)
    expected = load_unit(ref)
    ds = pydicom.dcmread(ref)
    ds.compress(RLELossless)
    rle = save(ds, tmp_path / "rle.dcm")
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(load_unit(rle), expected)

    ds = pydicom.dcmread(ref)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    defl = tmp_path / "deflate.dcm"
    ds.save_as(defl, enforce_file_format=True)
    assert pydicom.dcmread(defl).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(load_unit(defl), expected)


def test_jpeg2000_round_trip(tmp_path: Path) -> None:
    _px, ref = _reference(tmp_path)
    ds = pydicom.dcmread(ref)
    try:
        ds.compress(JPEG2000Lossless)
    except Exception as exc:  # pragma: no cover - encoder plugin absent
        pytest.skip(f"no JPEG 2000 encoder: {exc}")
    j2k = save(ds, tmp_path / "j2k.dcm")
    np.testing.assert_array_equal(load_unit(j2k), load_unit(ref))


@pytest.mark.parametrize(
    ("tool", "args", "lossless"),
    [
        ("/usr/bin/dcmcjpeg", ["+e1"], True),  # JPEG lossless SV1 (process 14)
        ("/usr/bin/dcmcjpeg", ["+eb"], False),  # JPEG baseline (8-bit, lossy)
        ("/usr/bin/dcmcjpls", ["+el"], True),  # JPEG-LS lossless
        ("/usr/bin/dcmcjpls", ["+en", "+md", "2"], False),  # JPEG-LS near-lossless, NEAR=2
    ],
)
def test_dcmtk_jpeg_syntaxes(tmp_path: Path, tool: str, args: list[str], lossless: bool) -> None:
    if not Path(tool).exists():
        pytest.skip(f"{tool} not installed (Debian package dcmtk): cannot make the test file")
    bits = 8 if "+eb" in args else 12
    _px, ref = _reference(tmp_path, bits=bits)
    out = tmp_path / "enc.dcm"
    proc = subprocess.run([tool, *args, str(ref), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ts = pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts.is_compressed
    got, expected = load_unit(out), load_unit(ref)
    if lossless:
        np.testing.assert_array_equal(got, expected, err_msg=ts.name)
    elif "+en" in args:
        # near-lossless: every pixel within NEAR = 2 stored levels
        assert np.abs(got - expected).max() <= 2 / 4095 + 1e-7, ts.name
        assert not np.array_equal(got, expected)
    else:
        # baseline JPEG of noise is lossy: close on average, same shape
        assert got.shape == expected.shape
        assert np.abs(got - expected).mean() < 0.1, ts.name


def test_nema_uncompressed_equals_jpeg2000(nema_dir: Path) -> None:
    for name in ("RG1", "RG3"):
        a = preprocess_path(nema_dir / f"{name}_UNCR.dcm")
        b = preprocess_path(nema_dir / f"{name}_J2KR.dcm")
        assert a.shape == (1, INPUT_SIZE, INPUT_SIZE)
        np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------- hostile input


def _no_big_allocation(fn, limit_mb: float = 64.0) -> BaseException:
    """Run fn (which must raise) and check Python-visible allocations stayed small."""
    tracemalloc.start()
    try:
        with pytest.raises(PreprocessError) as info:
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit_mb * 2**20, f"peak allocation {peak / 2**20:.1f} MiB"
    return info.value


def test_truncated_file(tmp_path: Path) -> None:
    _, ref = _reference(tmp_path)
    data = ref.read_bytes()
    for cut in (100, 300, len(data) - 500):
        p = tmp_path / f"trunc{cut}.dcm"
        p.write_bytes(data[:cut])
        with pytest.raises((Unreadable, PixelDataLengthMismatch, NoPixelData)) as info:
            preprocess_path(p)
        assert str(p) in str(info.value)
        assert "truncated" in str(info.value)


def test_missing_pixel_data(tmp_path: Path) -> None:
    ds = make_ds(ramp(), bits_stored=12)
    del ds.PixelData
    with pytest.raises(NoPixelData) as info:
        preprocess_path(save(ds, tmp_path / "nopix.dcm"))
    assert info.value.reason == "no-pixel-data"


def test_declared_65535_square_with_10_bytes(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((2, 2)), bits_stored=16)
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x00" * 10
    path = save(ds, tmp_path / "bomb.dcm")
    err = _no_big_allocation(lambda: preprocess_path(path))
    assert isinstance(err, MatrixTooLarge) and err.reason == "too-large"
    # Even with the limit raised past the declaration, the length check refuses it first.
    err = _no_big_allocation(lambda: preprocess_path(path, max_pixels=2**33))
    assert isinstance(err, PixelDataLengthMismatch)


def test_wrong_pixel_length(tmp_path: Path) -> None:
    ds = make_ds(ramp(), bits_stored=12)
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(PixelDataLengthMismatch) as info:
        preprocess_path(save(ds, tmp_path / "short.dcm"))
    assert info.value.reason == "pixel-length"
    ds = make_ds(ramp(), bits_stored=12)
    ds.PixelData = ds.PixelData + b"\x00\x00"  # a payload after the pixels
    with pytest.raises(PixelDataLengthMismatch, match="more than"):
        preprocess_path(save(ds, tmp_path / "long.dcm"))
    odd = make_ds(np.arange(15).reshape(3, 5), bits_stored=8)  # 15 bytes + 1 legal pad byte
    out = load_unit(save(odd, tmp_path / "odd.dcm"))
    np.testing.assert_allclose(out[0], np.arange(15).reshape(3, 5) / 255, atol=1e-7)


def test_rgb_dicom_and_images(tmp_path: Path) -> None:
    ds = make_ds(ramp(bits=8), bits_stored=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = np.zeros((64, 48, 3), np.uint8).tobytes()
    with pytest.raises(ColourImage):
        preprocess_path(save(ds, tmp_path / "rgb.dcm"))
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(ColourImage) as info:
        preprocess_path(tmp_path / "rgb.png")
    assert info.value.reason == "colour"


def test_unsupported_syntax(tmp_path: Path) -> None:
    ds = make_ds(ramp(), bits_stored=12)
    path = save(ds, tmp_path / "odd.dcm")
    raw = pydicom.dcmread(path)
    raw.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    raw.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not an image codec here
    raw.save_as(path)
    with pytest.raises(UnsupportedTransferSyntax) as info:
        read_dicom(path)
    assert info.value.reason == "unsupported-syntax"


def test_codestream_larger_than_header_refused(tmp_path: Path) -> None:
    """A JPEG 2000 stream claiming more rows than the header must not be decoded."""
    _px, ref = _reference(tmp_path)
    ds = pydicom.dcmread(ref)
    try:
        ds.compress(JPEG2000Lossless)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"no JPEG 2000 encoder: {exc}")
    ds.Rows = 20  # header now smaller than the 70-row codestream
    with pytest.raises(MatrixTooLarge):
        preprocess_dataset(ds)


def test_deflate_bomb_capped(tmp_path: Path) -> None:
    ds = make_ds(np.zeros((1024, 1024)), bits_stored=16)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "zbomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 100_000  # 2 MiB of zeros deflate to a few kB
    err = _no_big_allocation(lambda: read_dicom(path, max_pixels=1000))
    assert isinstance(err, MatrixTooLarge)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 20)
    with pytest.raises(Unreadable):
        preprocess_path(junk)
    with pytest.raises(Unreadable):
        preprocess_path(tmp_path / "absent.dcm")
    fake_png = tmp_path / "fake.png"
    fake_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(Unreadable):
        preprocess_path(fake_png)


# ----------------------------------------------------------------------- image files


def test_png_8_and_16_bit_and_grey_rgb(tmp_path: Path) -> None:
    a8 = (np.arange(64 * 64) % 256).reshape(64, 64).astype(np.uint8)
    Image.fromarray(a8).save(tmp_path / "g8.png")
    np.testing.assert_allclose(image_to_unit(tmp_path / "g8.png")[0], a8 / 255.0, atol=1e-7)
    a16 = (np.arange(64 * 64) * 16).reshape(64, 64).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(image_to_unit(tmp_path / "g16.png")[0], a16 / 65535.0, atol=1e-7)
    Image.fromarray(np.stack([a8] * 3, axis=-1)).save(tmp_path / "rgb_grey.png")
    np.testing.assert_array_equal(
        image_to_unit(tmp_path / "rgb_grey.png"), image_to_unit(tmp_path / "g8.png")
    )


def test_image_too_large_refused_before_decoding(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(MatrixTooLarge):
        image_to_unit(tmp_path / "big.png", max_pixels=10_000)


def test_kermany_jpeg_is_accepted(data_dir: Path) -> None:
    files = sorted((data_dir / "kermany224").rglob("*.jpeg"))[:3]
    if not files:
        pytest.skip("no kermany224 JPEGs found")
    for f in files:
        out = preprocess_path(f)
        assert out.shape == (1, INPUT_SIZE, INPUT_SIZE) and 0.0 <= out.min() <= out.max() <= 1.0


# ----------------------------------------------------------------------- resize


def test_resize_is_exact_area_average() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((448, 672))  # integer factors 2 and 3
    expected = x.reshape(224, 2, 224, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(resize_frame(x), expected, atol=1e-12)
    y = rng.random((300, 500))  # fractional factors: compare with a dense area matrix

    def area(n: int, m: int) -> np.ndarray:
        w = np.zeros((m, n))
        for i in range(m):
            a, b = i * n / m, (i + 1) * n / m
            for j in range(int(np.floor(a)), min(int(np.ceil(b)), n)):
                w[i, j] = max(0.0, min(b, j + 1) - max(a, j))
        return w / (n / m)

    dense = area(300, 224) @ y @ area(500, 224).T
    np.testing.assert_allclose(resize_frame(y), dense, atol=1e-12)
    z = rng.random((100, 150))  # upsampling also works (box filter)
    np.testing.assert_allclose(resize_frame(z), area(100, 224) @ z @ area(150, 224).T, atol=1e-12)
    assert resize_to_input(np.ones((2, 300, 500))).shape == (2, 224, 224)
    assert resize_frame(x[:224, :224]) is not None
    np.testing.assert_array_equal(resize_frame(x[:224, :224]), x[:224, :224])


def test_mutated_files_only_raise_typed_errors(tmp_path: Path) -> None:
    """300 random byte mutations of native, RLE, JPEG 2000 and deflated files: every failure
    is a PreprocessError (the Rust RLE decoder's panics included), never another exception."""
    import random

    seeds = []
    for ts in (None, RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian):
        ds = make_ds(ramp(72, 64), bits_stored=12)
        # fixed UIDs: the same seed bytes, so the same 300 mutants, in every run (with fresh
        # UIDs from make_ds and compress() the mutants moved, and one CI run met a case the
        # others had not: see test_malformed_header_element_is_unreadable)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.5", "1.2.3.6"
        if ts in (RLELossless, JPEG2000Lossless):
            ds.compress(ts, generate_instance_uid=False)
        elif ts is not None:
            ds.file_meta.TransferSyntaxUID = ts
        seeds.append(save(ds, tmp_path / f"seed{len(seeds)}.dcm").read_bytes())
    rng = random.Random(1234)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        b = bytearray(seeds[i % len(seeds)])
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(b))
            op = rng.random()
            if op < 0.6:
                b[pos] = rng.randrange(256)
            elif op < 0.8:
                del b[pos : pos + rng.randint(1, 40)]
            else:
                b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        p = tmp_path / "mutant.dcm"
        p.write_bytes(bytes(b))
        try:
            out = preprocess_path(p, max_pixels=4_000_000)
            assert out.shape[1:] == (INPUT_SIZE, INPUT_SIZE)
            assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
            outcomes["ok"] += 1
        except PreprocessError:
            outcomes["refused"] += 1
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0


def test_rle_decoder_panic_is_unreadable(tmp_path: Path) -> None:
    """One changed byte in an RLE segment makes the Rust decoder panic (found by mutation);
    the panic must surface as Unreadable, not as pyo3's PanicException (a BaseException)."""
    ds = make_ds(ramp(72, 64), bits_stored=12)
    ds.compress(RLELossless)
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    if len(frame) != 5392 or frame[3267] != 6:
        pytest.skip("pydicom's RLE encoder output changed; the panic case no longer applies")
    frame[3267] = 137  # a replicate run that writes past the segment's end
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    with pytest.raises(Unreadable) as info:
        preprocess_dataset(ds)
    assert info.value.reason == "unreadable"


def test_png_declaring_65535_square_refused_before_decoding(tmp_path: Path) -> None:
    """A PNG whose IHDR says 65535x65535 (tiny file): refused from the header, no allocation."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 65535, 65535, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
    path = tmp_path / "bomb.png"
    path.write_bytes(png + chunk(b"IEND", b""))
    err = _no_big_allocation(lambda: preprocess_path(path))
    assert isinstance(err, MatrixTooLarge)
    err = _no_big_allocation(lambda: preprocess_path(path, max_pixels=2**33))
    assert isinstance(err, (MatrixTooLarge, Unreadable))


@pytest.mark.parametrize(
    ("bits", "signed", "photometric"),
    [
        (12, False, "MONOCHROME1"),
        (16, False, "MONOCHROME2"),
        (10, True, "MONOCHROME2"),
        (8, False, "MONOCHROME1"),
    ],
)
def test_scoring_path_equals_normalise_then_resize(
    tmp_path: Path, bits: int, signed: bool, photometric: str
) -> None:
    """Scoring resizes stored integers and normalises the 224x224 result (cheaper); it must
    equal normalising first and resizing second (the definition) to float rounding."""
    rng = np.random.default_rng(bits)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    px = rng.integers(lo, hi + 1, size=(2, 517, 389))
    path = save(
        make_ds(px, bits_stored=bits, signed=signed, photometric=photometric), tmp_path / "f.dcm"
    )
    fused = preprocess_path(path)
    ds = read_dicom(path)
    definition = np.stack([resize_frame(u) for u in dataset_to_unit(ds)])
    np.testing.assert_allclose(fused, definition, atol=1e-6)  # float32 output
    ints = px[0].astype(np.int16 if signed else np.uint16)
    np.testing.assert_allclose(
        resize_frame(ints), resize_frame(ints.astype(np.float64)), rtol=1e-13, atol=1e-9
    )


def test_malformed_header_element_is_unreadable(tmp_path: Path) -> None:
    """An unknown VR in PhotometricInterpretation (found by the mutation test): pydicom parses
    the file and raises NotImplementedError only when the element is read; the header check
    must turn that into a typed refusal, as for any other malformed input."""
    ds = make_ds(ramp(72, 64), bits_stored=12)
    raw = save(ds, tmp_path / "ok.dcm").read_bytes()
    tag = b"\x28\x00\x04\x00CS"
    assert raw.count(tag) == 1
    bad = tmp_path / "bad-vr.dcm"
    bad.write_bytes(raw.replace(tag, b"\x28\x00\x04\x00C,"))
    with pytest.raises(Unreadable, match="header element is malformed"):
        preprocess_path(bad)


def test_resize_last_bin_when_the_float_edge_overshoots() -> None:
    """For n = 225, 450, 900, 2010, 3600 ... ``224 * (n / 224)`` is a hair above n in float64;
    the last output row/column then lost almost a whole input pixel (0.95 of the value at
    225). It must equal the exact area average like every other bin."""
    from resize_reference import area_reference

    rng = np.random.default_rng(5)
    for shape in [(225, 300), (300, 225), (450, 512), (900, 224), (2010, 230)]:
        x = rng.random(shape)
        np.testing.assert_allclose(resize_frame(x), area_reference(x), rtol=0, atol=1e-9)


_RESIZE_CASES = [
    ((512, 512), np.uint8, 255),
    ((513, 600), np.uint16, 4095),  # 12-bit, non-integer factors
    ((2500, 2048), np.uint16, 4095),
    ((2048, 2500), np.uint16, 65535),  # 16-bit
    ((3000, 3000), np.uint16, 65535),
    ((1000, 300), np.uint16, 4095),  # tall
    ((300, 1000), np.uint8, 255),  # wide
    ((225, 225), np.uint16, 4095),  # the smallest downsampling (and an overshooting edge)
    ((448, 672), np.uint16, 4095),  # integer factors 2 and 3
    ((600, 1000), np.float32, 1.0),
    ((1000, 600), np.float64, 1.0),
    ((517, 389), np.int32, 511),  # the signed path's int32 (sign-extended stored values)
    ((100, 150), np.uint16, 4095),  # upsampling
    ((100, 1000), np.float32, 1.0),  # up one axis, down the other
    ((224, 224), np.uint16, 4095),  # identity
    ((1024, 1024), np.uint16, 65535),  # the largest frame of the sparse path
    ((1025, 1024), np.uint16, 65535),  # the smallest of the row-by-row path
]


@pytest.mark.parametrize(("shape", "dtype", "top"), _RESIZE_CASES)
def test_resize_equals_slow_reference_and_previous_implementation(
    shape: tuple[int, int], dtype: type, top: float
) -> None:
    """The fast resize (rows first, integer sums) against a slow per-bin area average with
    exact fractional edges, and against the implementation the bundles were trained with
    (tests/resize_reference.py), to float64 rounding: any change of the result fails."""
    from resize_reference import area_reference, resize_frame_v1

    rng = np.random.default_rng(sum(shape))
    if np.dtype(dtype).kind == "f":
        x = rng.random(shape).astype(dtype)
    else:
        x = rng.integers(-top - 1 if dtype is np.int32 else 0, top + 1, size=shape).astype(dtype)
    new = resize_frame(x)
    assert new.shape == (INPUT_SIZE, INPUT_SIZE) and new.dtype == np.float64
    ref = area_reference(x)
    tol = 1e-9 * max(1.0, float(np.abs(ref).max()))
    assert np.abs(new - ref).max() <= tol
    if shape[0] != 225:  # v1's last row/column is wrong there (see the test above)
        old = resize_frame_v1(x)
        assert np.abs(new - old).max() <= 1e-9 * max(1.0, float(np.abs(old).max()))
    if shape == (INPUT_SIZE, INPUT_SIZE):
        np.testing.assert_array_equal(new, x)
    # the tolerance discriminates: moving every bin by one input pixel is far outside it
    assert np.abs(area_reference(np.roll(x, 1, axis=0)) - ref).max() > 1000 * tol


@pytest.mark.parametrize("shape", [(512, 512), (513, 600), (100, 150), (300, 1000)])
def test_resize_sparse_and_row_paths_agree(shape: tuple[int, int],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Small frames take the sparse product, large ones the row-by-row sums; the size limit
    between them must not change a score: the two paths give the same numbers on the same
    frame, and each bin's weights sum to one."""
    from detector import preprocess

    x = np.random.default_rng(3).integers(0, 4096, size=shape).astype(np.uint16)
    sparse = resize_frame(x)
    monkeypatch.setattr(preprocess, "_SPARSE_RESIZE_MAX_PIXELS", 0)
    rows = resize_frame(x)
    assert np.abs(sparse - rows).max() <= 1e-9 * 4095
    for n in shape:
        weights = preprocess._area_matrix(n, INPUT_SIZE)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_resize_to_input_stack_equals_reference() -> None:
    """A stack of float32 [0, 1] frames: each frame the reference, clipped, as float32."""
    from resize_reference import area_reference

    x = np.random.default_rng(9).random((3, 513, 600)).astype(np.float32)
    out = resize_to_input(x)
    assert out.shape == (3, INPUT_SIZE, INPUT_SIZE) and out.dtype == np.float32
    for frame, got in zip(x, out, strict=True):
        want = np.clip(area_reference(frame), 0.0, 1.0).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
