"""DICOM datasets and image files to float32 images in [0, 1], and then to the 224x224 input.

One definition of intensity, used by scoring *and* training (``train`` imports this module),
so clean and perturbed images always travel the identical path:

* **Normalisation "bitdepth-v1"**: a stored pixel value ``s`` maps to
  ``(s - lo) / (hi - lo)`` where ``[lo, hi]`` is the range BitsStored and PixelRepresentation
  allow (``[0, 2^B - 1]`` unsigned, ``[-2^(B-1), 2^(B-1) - 1]`` signed). It depends on the
  header only, never on the image content (no per-image windowing), so an attacker's
  perturbation of k stored levels always becomes ``k / (hi - lo)`` on the [0, 1] scale and the
  same pixel value always gives the same number. Rescale Slope/Intercept is a linear modality
  LUT; the intercept cancels out of a range normalisation and only a negative slope matters
  (it reverses the order, so the result is flipped). MONOCHROME1 (high value = dark) is
  inverted so that 1.0 is always white. VOI LUT / windowing is ignored on purpose: it is
  display metadata, not pixel data.
* **Image files** (PNG/JPEG): 8-bit grey ``/255``, 16-bit grey ``/65535``; RGB with R = G = B
  (how the Kermany set is stored) is grey, true colour is refused.
* **Resize** "area-exact": each output pixel is the exact mean of the input area it covers
  (box filter with fractional edges), computed from exact integer sums of whole rows, then
  of whole columns of the reduced image, plus float64 shares of the boundary pixels. No
  library resampler, so results do not drift with Pillow/OpenCV versions; 224x224 inputs
  pass through unchanged.

Decoders. Compressed transfer syntaxes are decoded by pydicom's pixel handlers backed by
pylibjpeg with its plugins: pylibjpeg-libjpeg (JPEG baseline, extended, lossless, JPEG-LS),
pylibjpeg-openjpeg (JPEG 2000) and pylibjpeg-rle (RLE; pydicom's own numpy RLE decoder is the
fallback); deflate is zlib in pydicom itself. We chose these over python-gdcm because all of
them are plain pip wheels with no system library to install or keep in step with the OS,
they cover every syntax listed above, and pydicom selects them automatically; GDCM would add
a large C++ dependency for no syntax we need.

Defences. ``read_dicom`` parses the header with large values deferred (the Pixel Data bytes
are not read), checks Rows x Columns x Frames against ``max_pixels`` *before* touching pixel
data, so a forged 65535x65535 declaration never allocates, and refuses colour, missing pixel
data, undecodable syntaxes and native pixel data shorter than the header declares, each with
its own ``PreprocessError`` subclass.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.filereader
import pydicom.pixels
import scipy.sparse
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
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

INPUT_SIZE = 224
NORMALISATION = "bitdepth-v1"
RESIZE_METHOD = "area-exact"
# 64 Mi pixels: a 4300x3500 DX is 15 M, a 1024x1024x60-frame series 63 M. Decoding stores
# at most this many 16-bit values (128 MiB) plus one frame in float64.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# Header values larger than this stay on disk until asked for (the Pixel Data, mostly).
_DEFER_SIZE = 4096

_MONO = ("MONOCHROME1", "MONOCHROME2")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


# --------------------------------------------------------------------------- DICOM header


def skip_value_checks() -> None:
    """Stop pydicom checking each value it reads or each UID it builds against its VR.

    Why: in its default mode the check only warns (a regex per UID, DS, IS, CS ... value),
    and ``sentinel serve`` and its scoring processes discard every warning (hostile input
    must not grow memory or quote values into the log), so the checks cost CPU for nothing.
    pynetdicom builds every UID of an association request through them: a DCMTK storescu
    proposing 128 contexts made ~1,900 of them per association. Nothing is accepted that
    was refused before: the warn mode never raised, and the gateway's own checks (SOP UIDs,
    header limits) are its own code. Process-wide (pydicom's config), so only those two
    entry points call it; ``sentinel score`` and training keep pydicom's warnings.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def read_dicom(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """Parse a DICOM file with the Pixel Data deferred and run the header checks.

    Raises ``Unreadable`` for a file pydicom cannot parse, and the header refusals of
    ``check_header``. The Pixel Data bytes are read only later, by ``dataset_to_unit``.
    """
    ds = parse_dicom(path, max_pixels)
    check_header(ds, max_pixels=max_pixels, source=str(path))
    return ds


def parse_dicom(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """Parse any DICOM file (image or not) with large values deferred, without image checks.

    For callers that must also handle non-image instances (the gateway routes SR and
    presentation states too). Raises ``Unreadable`` for a file pydicom cannot parse. A
    deflated dataset is inflated here with an output cap (a zip bomb in the deflate stream
    stops at the cap instead of exhausting memory).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = pydicom.filereader.read_file_meta_info(path)
            ts = meta.get("TransferSyntaxUID")
            if ts == DeflatedExplicitVRLittleEndian:
                ds = _read_deflated(path, max_pixels)
            else:
                ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
    except PreprocessError:
        raise
    except FileNotFoundError as exc:
        raise Unreadable(f"{path}: no such file") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise Unreadable(f"{path}: not a readable DICOM file ({exc})") from exc
    return ds


def _read_deflated(path: Path, max_pixels: int) -> Dataset:
    """Read a Deflated Explicit VR Little Endian file, inflating at most a bounded size.

    pydicom inflates the whole stream in one go; we inflate with ``max_length`` so the
    output can never exceed 2 bytes per allowed pixel plus 16 MiB of other attributes.
    """
    cap = 2 * max_pixels + (16 << 20)
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        meta = pydicom.filereader._read_file_meta_info(fh)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(fh.read(), cap)
    if inflater.unconsumed_tail:
        raise MatrixTooLarge(
            f"{path}: deflated dataset inflates to more than {cap} bytes, beyond what "
            f"max_pixels={max_pixels} allows (a decompression bomb or a huge image)"
        )
    ds = pydicom.filereader.read_dataset(
        io.BytesIO(data), is_implicit_VR=False, is_little_endian=True
    )
    ds.file_meta = meta
    ds.filename = str(path)
    return ds


def _int_attr(ds: Dataset, keyword: str, default: int | None, source: str) -> int:
    """An integer header attribute, with a typed error when it is missing or malformed."""
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            raise Unreadable(f"{source}: required attribute {keyword} is missing")
        return int(value)
    except PreprocessError:
        raise
    except Exception as exc:
        raise Unreadable(f"{source}: attribute {keyword} is unreadable ({exc})") from exc


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax: from the file meta, else from how it was encoded."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = True, True
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


@contextlib.contextmanager
def _header_errors(source: str) -> Iterator[None]:
    """Map what pydicom raises on a malformed element to ``Unreadable``.

    Why: pydicom converts an element only when it is first read, so a corrupt VR or value in
    the header surfaces here, as NotImplementedError, KeyError or whatever the converter
    raises (found by mutation: an unknown VR in PhotometricInterpretation), not at parse time.
    """
    try:
        yield
    except PreprocessError:
        raise
    except Exception as exc:
        raise Unreadable(f"{source}: a header element is malformed ({exc})") from exc


def check_header(ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "") -> None:
    """Refuse a dataset from its header alone, before any pixel is read or decoded."""
    with _header_errors(source or "dataset"):
        _check_header(ds, max_pixels, source or "dataset")


def _check_header(ds: Dataset, max_pixels: int, src: str) -> None:
    if "PixelData" not in ds:
        if "SOPClassUID" not in ds:
            # pydicom stops quietly at end of file; a dataset without even its SOP Class
            # is a file cut short (or not DICOM at all), not a valid object without pixels.
            raise Unreadable(
                f"{src}: no SOP Class UID and no Pixel Data: the file is truncated or corrupt"
            )
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            hint = " (float pixel data is not an X-ray image this detector handles)"
        elif "Rows" in ds or "Columns" in ds:
            hint = " although the header describes an image: truncated or pixel data stripped"
        else:
            hint = " (not an image object)"
        raise NoPixelData(f"{src}: no Pixel Data (7FE0,0010){hint}")
    rows = _int_attr(ds, "Rows", None, src)
    cols = _int_attr(ds, "Columns", None, src)
    frames = _int_attr(ds, "NumberOfFrames", 1, src)
    spp = _int_attr(ds, "SamplesPerPixel", 1, src)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp != 1 or (photometric and photometric not in _MONO):
        raise ColourImage(
            f"{src}: colour image (SamplesPerPixel={spp}, PhotometricInterpretation="
            f"{photometric or 'missing'}); only MONOCHROME1/2 greyscale X-rays are screened"
        )
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise Unreadable(f"{src}: impossible matrix Rows={rows} Columns={cols} Frames={frames}")
    declared = rows * cols * frames
    if declared > max_pixels:
        raise MatrixTooLarge(
            f"{src}: declared matrix {rows}x{cols}x{frames} frames = {declared} pixels exceeds "
            f"the limit of {max_pixels}; raise max_pixels in the detector config if such "
            "images are genuine"
        )
    bits_alloc = _int_attr(ds, "BitsAllocated", None, src)
    bits_stored = _int_attr(ds, "BitsStored", bits_alloc, src)
    pixel_rep = _int_attr(ds, "PixelRepresentation", 0, src)
    if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc or pixel_rep not in (0, 1):
        raise UnsupportedTransferSyntax(
            f"{src}: BitsAllocated={bits_alloc}, BitsStored={bits_stored}, "
            f"PixelRepresentation={pixel_rep} is not a greyscale encoding this detector "
            "handles (8 or 16 bits allocated, up to 16 stored)"
        )
    ts = _transfer_syntax(ds)
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(
            f"{src}: transfer syntax {ts} ({ts.name}) has no pixel data decoder"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"{src}: transfer syntax {ts} ({ts.name}) needs a decoder plugin that is not "
            "installed (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle)"
        )


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest stored value BitsStored and PixelRepresentation allow."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _load_pixel_bytes(ds: Dataset, source: str) -> bytes:
    """Read the (deferred) Pixel Data value, mapping I/O failures to ``Unreadable``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ds.PixelData
    except Exception as exc:
        raise Unreadable(f"{source}: Pixel Data could not be read ({exc})") from exc
    if value is None:
        raise NoPixelData(f"{source}: Pixel Data (7FE0,0010) is empty")
    return value


def _iter_frames(ds: Dataset, source: str, max_pixels: int) -> Iterator[np.ndarray]:
    """Decoded frames of a checked dataset, one 2-D array of stored values at a time."""
    check_header(ds, max_pixels=max_pixels, source=source)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits_alloc = int(ds.BitsAllocated)
    ts = _transfer_syntax(ds)
    data = _load_pixel_bytes(ds, source)
    if not ts.is_encapsulated:
        expected = rows * cols * frames * (bits_alloc // 8)
        if len(data) < expected:
            raise PixelDataLengthMismatch(
                f"{source}: Pixel Data holds {len(data)} bytes, the header declares "
                f"{rows}x{cols}x{frames} frames x {bits_alloc // 8} bytes = {expected}; the "
                "file is truncated or its header is wrong"
            )
        if len(data) > expected + (expected % 2):  # one pad byte to even length is legal
            raise PixelDataLengthMismatch(
                f"{source}: Pixel Data holds {len(data)} bytes, {len(data) - expected} more "
                f"than the {rows}x{cols}x{frames} frames x {bits_alloc // 8} bytes the header "
                "declares; refusing data the header does not account for"
            )
    elif len(data) < 16:
        raise PixelDataLengthMismatch(
            f"{source}: encapsulated Pixel Data of {len(data)} bytes cannot hold {frames} frame(s)"
        )
    else:
        _check_codestreams(data, ts, rows, cols, frames, source)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    # We mask unused bits ourselves (_valid_bits); pydicom's own correction copies the frame.
    frames_iter = pydicom.pixels.iter_pixels(ds, correct_unused_bits=False)
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frame = next(frames_iter)
        except StopIteration:
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # BaseException: the Rust decoders (pylibjpeg-rle) turn a panic on malformed
            # input into pyo3's PanicException, which does not derive from Exception.
            raise Unreadable(
                f"{source}: pixel data could not be decoded ({ts.name}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if frame.shape != (rows, cols):
            raise Unreadable(
                f"{source}: decoded frame has shape {frame.shape}, header declares {rows}x{cols}"
            )
        yield frame


def _codestream_size(frame: bytes, ts: UID) -> tuple[int, int] | None:
    """(rows, columns) a JPEG / JPEG-LS / JPEG 2000 codestream declares, None if not found."""
    if ts in JPEG2000TransferSyntaxes:
        at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ
        if at < 0 or len(frame) < at + 24:
            return None
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 8 : at + 24])
        return ysiz - yo, xsiz - xo
    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        info = _get_jpg_parameters(frame[:65536])
        if "height" not in info:
            return None
        return int(info["height"]), int(info["width"])
    return None


def _check_codestreams(
    data: bytes, ts: UID, rows: int, cols: int, frames: int, source: str
) -> None:
    """Refuse codestreams that declare a larger matrix than the DICOM header.

    Decoder plugins allocate what the codestream declares, not what the header says, so a
    100x100 header wrapping a 65535x65535 JPEG would bypass the header guard.
    """
    if not (
        ts in JPEG2000TransferSyntaxes or ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes
    ):
        return
    try:
        encoded = pydicom.encaps.generate_frames(data, number_of_frames=frames)
        for i, frame in enumerate(encoded):
            if i >= frames:
                break
            size = _codestream_size(frame, ts)
            if size is None:
                continue
            h, w = size
            if h <= 0 or w <= 0 or h > rows or w > cols:
                raise MatrixTooLarge(
                    f"{source}: frame {i} codestream declares {h}x{w}, the header "
                    f"{rows}x{cols}; refusing to decode a mismatched (possibly hostile) stream"
                )
    except PreprocessError:
        raise
    except Exception as exc:
        raise Unreadable(f"{source}: encapsulated Pixel Data is malformed ({exc})") from exc


def _valid_bits(frame: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values with the bits above BitsStored masked off (unsigned) or sign-extended
    from bit BitsStored-1 (signed): the standard says those bits carry no pixel value."""
    if signed:
        v = frame.astype(np.int32)
        sign = 1 << (bits_stored - 1)
        v &= (1 << bits_stored) - 1
        v ^= sign
        v -= sign
        return v
    if bits_stored < frame.dtype.itemsize * 8:
        return frame & np.array((1 << bits_stored) - 1, dtype=frame.dtype)
    return frame


def _normalise(values: np.ndarray, bits_stored: int, signed: bool, invert: bool) -> np.ndarray:
    """float64 stored values (or means of them) to [0, 1], in place: bitdepth-v1."""
    lo, hi = _stored_range(bits_stored, signed)
    if lo:
        values -= lo
    values *= 1.0 / (hi - lo)
    if invert:
        np.subtract(1.0, values, out=values)
    return values


def stored_to_unit(
    frame: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    invert: bool,
) -> np.ndarray:
    """Stored pixel values to float64 [0, 1] by the stored range (normalisation bitdepth-v1).

    Bits above BitsStored are masked off (unsigned) or sign-extended (signed). ``invert``
    flips 0 and 1 (MONOCHROME1, or a negative Rescale Slope; both together cancel).
    """
    v = _valid_bits(frame, bits_stored, signed)
    return _normalise(v.astype(np.float64), bits_stored, signed, invert)


def unit_params(ds: Dataset, source: str = "dataset") -> tuple[int, bool, bool]:
    """(BitsStored, signed, invert) for ``stored_to_unit`` from a checked header.

    Public so that training can map [0, 1] values back onto stored values exactly.
    """
    with _header_errors(source):
        bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        invert = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
        raw_slope = ds.get("RescaleSlope", 1.0)
    try:
        slope = float(raw_slope or 1.0)
    except (TypeError, ValueError) as exc:
        raise Unreadable(f"{source}: RescaleSlope is not a number") from exc
    if slope < 0:
        invert = not invert
    return bits_stored, signed, invert


_unit_params = unit_params  # the name train/dicom_attack.py first used


def iter_unit_frames(
    ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = ""
) -> Iterator[np.ndarray]:
    """Each frame of a dataset as float64 (rows, cols) in [0, 1], decoded one at a time."""
    src = source or str(getattr(ds, "filename", "") or "dataset")
    check_header(ds, max_pixels=max_pixels, source=src)
    bits_stored, signed, invert = unit_params(ds, src)
    for frame in _iter_frames(ds, src, max_pixels):
        yield stored_to_unit(frame, bits_stored=bits_stored, signed=signed, invert=invert)


def iter_input_frames(
    ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "", size: int = INPUT_SIZE,
    native: Callable[[np.ndarray, int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Each frame as float32 (size, size) in [0, 1]: the scoring path.

    Area averaging is linear and the normalisation affine, so the frame is resized while
    still in stored integers and only the 224x224 result is normalised: the same values as
    ``resize_frame(stored_to_unit(frame))`` to ~1e-15, without a full-size float64 copy of
    the image (a 2048x2500 frame: ~40 MB of memory traffic and ~30 ms saved). ``native``, if
    given, sees each frame at its native matrix first (stored values, BitsStored).
    """
    src = source or str(getattr(ds, "filename", "") or "dataset")
    check_header(ds, max_pixels=max_pixels, source=src)
    bits_stored, signed, invert = unit_params(ds, src)
    for frame in _iter_frames(ds, src, max_pixels):
        valid = _valid_bits(frame, bits_stored, signed)
        if native is not None:
            native(valid, bits_stored)
        small = resize_frame(valid, size)
        unit = _normalise(small, bits_stored, signed, invert).astype(np.float32)
        yield np.clip(unit, 0.0, 1.0, out=unit)


def dataset_to_unit(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """All frames of a dataset as float32 (frames, rows, cols) in [0, 1] at the native matrix."""
    return np.stack([f.astype(np.float32) for f in iter_unit_frames(ds, max_pixels)])


# --------------------------------------------------------------------------- image files


def image_to_unit(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PNG/JPEG file as float32 (1, rows, cols) in [0, 1].

    8-bit grey is divided by 255, 16-bit grey by 65535. RGB(A) whose three channels are equal
    is grey (fully opaque alpha is dropped); anything else is a ``ColourImage``. The size is
    checked from the header before decoding.
    """
    path = Path(path)
    try:
        im = Image.open(path)
    except FileNotFoundError as exc:
        raise Unreadable(f"{path}: no such file") from exc
    except Image.DecompressionBombError as exc:
        raise MatrixTooLarge(f"{path}: {exc}") from exc
    except Exception as exc:
        raise Unreadable(f"{path}: not a readable image ({exc})") from exc
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise MatrixTooLarge(
                f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
            )
        try:
            im.load()
            arr, scale = _image_array(im, path)
        except PreprocessError:
            raise
        except Exception as exc:
            raise Unreadable(f"{path}: image could not be decoded ({exc})") from exc
    unit = (arr.astype(np.float32) * np.float32(1.0 / scale))[None]
    return np.clip(unit, 0.0, 1.0, out=unit)


def _image_array(im: Image.Image, path: Path) -> tuple[np.ndarray, float]:
    """Grey pixel values of a loaded Pillow image and the value that maps to 1.0."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im.convert("L")), 255.0
    if mode == "L":
        return np.asarray(im), 255.0
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16), 65535.0
    if mode in ("I", "I;32"):
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise Unreadable(f"{path}: 32-bit integer image with values beyond 16 bits")
        return arr, 65535.0 if arr.max() > 255 or im.format == "PNG" else 255.0
    if mode in ("LA", "La"):
        arr = np.asarray(im)
        if arr[..., 1].min() != 255:
            raise ColourImage(f"{path}: grey image with transparency; save it without alpha")
        return arr[..., 0], 255.0
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        rgba = np.asarray(im.convert("RGBA"))
        if rgba[..., 3].min() != 255:
            raise ColourImage(f"{path}: image with transparency; save it as opaque greyscale")
        r, g, b = rgba[..., 0], rgba[..., 1], rgba[..., 2]
        if not (np.array_equal(r, g) and np.array_equal(g, b)):
            raise ColourImage(
                f"{path}: true colour image ({mode} with differing channels); the detector "
                "screens greyscale X-rays only"
            )
        return r, 255.0
    raise ColourImage(f"{path}: image mode {mode} is not greyscale")


# --------------------------------------------------------------------------- resize


def _area_rows_t(a: np.ndarray, out: int) -> np.ndarray:
    """Exact area average of the 2-D ``a`` along axis 0 to ``out`` rows, returned transposed:
    float64 (cols, out), so that applying it twice resizes both axes.

    Output row j is the mean of the input over [e_j, e_j+1), e_j = j * n / out: the rows
    wholly inside it, [ceil(e_j), ceil(e_j+1)), summed, plus the share ceil(e_j) - e_j of row
    floor(e_j) that lies in bin j, minus the share of row floor(e_j+1) that belongs to bin
    j+1 (that row was summed whole). The same formula upsamples (n < out): a bin inside one
    pixel has no whole row and takes its two shares of that pixel.

    Why rows: summing whole rows is one vectorised add per row of a bin (``sums += a[start +
    t]`` over every bin and column at once, ~n/out calls), where ``np.add.reduceat`` pays
    numpy's per-segment overhead for each of rows x 224 tiny segments along the contiguous
    axis, and walks each column separately along axis 0 (on 2500x2048 uint16: 2.0 ms against
    6.5 ms and 37 ms; a cumulative sum along axis 0 took 73 ms; bench/RESULTS.md).
    ``resize_frame`` therefore reduces the rows of the full image first and the columns only
    of the small result. The bins are taken in blocks of ~64 KB of output so that the
    accumulator stays in cache and no full-size float64 temporary is allocated (each fresh
    multi-MB array costs page faults that were half the time on a 2048-column frame); the
    transposed result is written block by block, which spares a separate transpose.

    Exact: integer input (stored pixel values) is summed in int32, or int64 for wider integer
    types or bins of 2^15 rows or more: fewer than 2^15 values of at most 16 bits stay below
    2^31 and integer addition has no rounding, so the whole-row sums are exact, and so is
    their conversion to float64 (below 2^53). Only the two boundary shares and the scaling
    are rounded, in float64, as before; float input is summed in float64 (its sums round
    like the previous reduceat's, in another order: ~1e-16 relative). No full-size float
    copy of the frame is made.
    """
    n, cols = a.shape
    if n == out:
        return np.ascontiguousarray(a.T, dtype=np.float64)
    edges = np.arange(out + 1, dtype=np.float64) * (n / out)
    # out * (n / out) rounds above n for some n (225, 450, 900, 2010, ...): the last bin
    # would then give back almost a whole pixel it never summed. The last edge is n exactly.
    edges[-1] = n
    first = np.ceil(edges).astype(np.intp)  # first whole row of each bin, end of the previous
    width = np.diff(first)  # whole rows per bin: floor(n / out) or one more
    share = (first - edges)[:, None]  # share of row floor(e_j) in bin j; 0 if e_j is whole
    boundary = np.minimum(np.floor(edges).astype(np.intp), n - 1)
    if a.dtype.kind in "iu":
        narrow = a.dtype.itemsize <= 2 and width.max() < (1 << 15)
        acc = np.int32 if narrow else np.int64
    else:
        acc = np.float64
    result = np.empty((cols, out))
    block = max(16, (1 << 16) // max(cols, 1))
    for b in range(0, out, block):
        e = min(b + block, out)
        start, w = first[b:e], width[b:e]
        sums = np.zeros((e - b, cols), dtype=acc)
        for t in range(int(w.max())):
            if t < w.min():  # every bin of the block has a t-th whole row
                sums += a[start + t]
            else:  # only the bins one row wider
                wide = np.flatnonzero(w > t)
                sums[wide] += a[start[wide] + t]
        part = a[boundary[b : e + 1]] * share[b : e + 1]
        mean = np.add(sums, part[:-1], dtype=np.float64)
        mean -= part[1:]
        mean *= out / n
        result[:, b:e] = mean.T
    return result


# Frames up to this many pixels are resized by two sparse products (``_area_matrix``), larger
# ones row by row (``_area_rows_t``); the crossover measured in bench/RESULTS.md.
_SPARSE_RESIZE_MAX_PIXELS = 1 << 20


@functools.lru_cache(maxsize=16)
def _area_matrix(n: int, out: int) -> scipy.sparse.csr_array:
    """The exact area average from ``n`` pixels to ``out`` as a sparse (out, n) matrix.

    Bin j covers [j * n / out, (j + 1) * n / out); pixel p covers [p, p + 1). In units of
    1/out of a pixel both are integers (bin: [j * n, (j + 1) * n), pixel: [p * out, (p + 1)
    * out)), so each overlap is an exact integer and the weight, overlap / n, is its only
    rounding; the weights of a bin sum to 1. Built once per (n, out): a modality sends one
    matrix size all day.
    """
    j = np.arange(out, dtype=np.int64)
    first = j * n // out
    last = np.minimum(n - 1, -(-(j + 1) * n // out) - 1)  # the last pixel the bin overlaps
    counts = last - first + 1
    rows = np.repeat(j, counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.repeat(first, counts) + offsets
    overlap = (np.minimum((rows + 1) * n, (cols + 1) * out)
               - np.maximum(rows * n, cols * out))
    keep = overlap > 0
    return scipy.sparse.csr_array((overlap[keep] / n, (rows[keep], cols[keep])),
                                  shape=(out, n))


def resize_frame(frame: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """One 2-D image to (size, size) float64 by exact area averaging.

    Small frames (up to ``_SPARSE_RESIZE_MAX_PIXELS``, e.g. 512x512 or 1024x1024) are
    resized as ``rows @ frame @ cols.T`` with the sparse bin matrices of ``_area_matrix``:
    two C loops over the few weights per bin, where the row-by-row path pays numpy's
    per-call overhead ~n/out times per block (512x512: ~0.4 ms against ~0.75 ms). Larger
    frames reduce the rows of the full image first (``_area_rows_t``: whole rows added,
    integers summed exactly as integers), then the rows of its transposed (cols, size)
    result, i.e. the columns: the sparse product would need a full-size float64 copy of the
    frame (2500x2048: 40 MB, 3x slower). Both paths equal the previous implementation
    (``np.add.reduceat`` along the contiguous axis first) to float64 rounding;
    tests/test_preprocess.py checks them against a slow exact reference
    (tests/resize_reference.py).
    """
    if frame.ndim != 2:
        raise ValueError(f"resize_frame expects a 2-D image, got shape {frame.shape}")
    if frame.shape == (size, size):
        return frame.astype(np.float64, copy=False)
    if frame.size <= _SPARSE_RESIZE_MAX_PIXELS:
        rows = _area_matrix(frame.shape[0], size) @ frame.astype(np.float64, copy=False)
        return np.ascontiguousarray((_area_matrix(frame.shape[1], size) @ rows.T).T)
    return _resize_rows_first(frame, size)


def _resize_rows_first(frame: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """``resize_frame``'s path for frames above ``_SPARSE_RESIZE_MAX_PIXELS``: the rows of
    the full frame summed first, then those of the transposed (cols, size) result."""
    return _area_rows_t(_area_rows_t(frame, size), size)


def resize_to_input(frames: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """(frames, rows, cols) to float32 (frames, size, size) in [0, 1] by exact area averaging."""
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"resize_to_input expects (frames, rows, cols), got {frames.shape}")
    out = np.empty((frames.shape[0], size, size), dtype=np.float32)
    for i, frame in enumerate(frames):
        out[i] = resize_frame(frame, size)
    np.clip(out, 0.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------- entry points


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when the file carries the DICOM Part 10 preamble magic ``DICM`` at offset 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def sniff_format(path: Path) -> str:
    """'dicom' or 'image' by content, never by file name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except FileNotFoundError as exc:
        raise Unreadable(f"{path}: no such file") from exc
    except OSError as exc:
        raise Unreadable(f"{path}: cannot be read ({exc})") from exc
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        return "image"
    raise Unreadable(
        f"{path}: neither a DICOM Part 10 file (no 'DICM' at offset 128) nor a PNG/JPEG image"
    )


def load_unit(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A DICOM or image file (detected by content) as float32 (frames, rows, cols) in [0, 1]."""
    path = Path(path)
    if sniff_format(path) == "dicom":
        ds = read_dicom(path, max_pixels=max_pixels)
        return dataset_to_unit(ds, max_pixels=max_pixels)
    return image_to_unit(path, max_pixels=max_pixels)


def preprocess_dataset(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A dataset to float32 (frames, 224, 224) in [0, 1], one frame decoded at a time."""
    return np.stack(list(iter_input_frames(ds, max_pixels)))


def preprocess_path(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A DICOM or image file to float32 (frames, 224, 224) in [0, 1]."""
    path = Path(path)
    if sniff_format(path) == "dicom":
        return preprocess_dataset(read_dicom(path, max_pixels=max_pixels), max_pixels)
    return resize_to_input(image_to_unit(path, max_pixels=max_pixels))
