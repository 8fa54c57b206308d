"""Typed errors of the detector runtime.

Callers (the gateway, ``sentinel score``) must tell a bad input apart from a bad model and
record *why* an instance could not be screened, so each refusal is its own class with a short
machine-readable ``reason`` (used in audit records and JSON output) and a message that names
the file and the fix.
"""

from __future__ import annotations

from typing import ClassVar


class PreprocessError(ValueError):
    """An input that cannot be turned into a [0, 1] image; ``reason`` says which check failed."""

    reason: ClassVar[str] = "unreadable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoPixelData(PreprocessError):
    """The dataset has no Pixel Data (7FE0,0010): a structured report, a stripped file."""

    reason = "no-pixel-data"


class ColourImage(PreprocessError):
    """A colour image (RGB, YBR, palette, colour PNG/JPEG): the detector models grey X-rays."""

    reason = "colour"


class MatrixTooLarge(PreprocessError):
    """Rows x Columns x Frames declared in the header exceeds the configured limit.

    Checked from the header before any pixel is decoded, so a forged declaration cannot make
    the process allocate gigabytes (a decompression bomb).
    """

    reason = "too-large"


class UnsupportedTransferSyntax(PreprocessError):
    """A transfer syntax no installed decoder handles."""

    reason = "unsupported-syntax"


class PixelDataLengthMismatch(PreprocessError):
    """Uncompressed Pixel Data shorter than Rows x Columns x Frames x BitsAllocated/8 declares."""

    reason = "pixel-length"


class Unreadable(PreprocessError):
    """Not a DICOM file or image this runtime can parse (truncated, corrupt, unknown format)."""

    reason = "unreadable"


class BundleError(RuntimeError):
    """A model bundle that is missing, corrupt or does not verify; the message names the file."""
