"""The detector CNN, run by the LiteRT interpreter (no TensorFlow at run time).

LiteRT (``ai-edge-litert``, the maintained successor of tflite-runtime) runs the TFLite
flatbuffer that training exports; it is a small wheel that works with numpy 2 and loads a
model as data (a flatbuffer, no code). The contract with training: input float32
(1, 224, 224, 1) in [0, 1], output float32 (1, 1), the sigmoid probability that the image is
perturbed.

Threading: an interpreter holds its tensors and scratch arena, so one ``LiteRTModel`` must
not be used by two threads at once. It is reusable (tensors are allocated once) and cheap to
call; the gateway gives each worker thread its own ``Detector`` and hence its own model.
``num_threads`` is LiteRT's intra-op thread count (1 is best for small models on a shared
machine; more only helps a large CNN on an idle one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from detector.errors import BundleError
from detector.preprocess import INPUT_SIZE


class LiteRTModel:
    """One TFLite binary classifier with a reusable interpreter (not thread-safe)."""

    def __init__(self, path: str | os.PathLike[str], num_threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter  # light, but only when needed

        self.path = Path(path)
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        try:
            self._interp = Interpreter(model_path=str(self.path), num_threads=num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as exc:
            raise BundleError(
                f"model bundle file {self.path}: LiteRT cannot load it as a TFLite model ({exc}); "
                "re-export the bundle"
            ) from exc
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        want_in = (1, INPUT_SIZE, INPUT_SIZE, 1)
        if (
            len(inputs) != 1
            or tuple(inputs[0]["shape"]) != want_in
            or inputs[0]["dtype"] != np.float32
        ):
            got = [(tuple(d["shape"]), np.dtype(d["dtype"]).name) for d in inputs]
            raise BundleError(
                f"model bundle file {self.path}: CNN input is {got}, expected one float32 "
                f"tensor of shape {want_in}; re-export the CNN"
            )
        if len(outputs) != 1 or int(np.prod(outputs[0]["shape"])) != 1:
            got = [tuple(d["shape"]) for d in outputs]
            raise BundleError(
                f"model bundle file {self.path}: CNN output is {got}, expected one (1, 1) "
                "probability; re-export the CNN"
            )
        self._in = inputs[0]["index"]
        self._out = outputs[0]["index"]
        self._buf = np.zeros(want_in, dtype=np.float32)

    def _one(self, img: np.ndarray) -> float:
        self._buf[0, :, :, 0] = img
        self._interp.set_tensor(self._in, self._buf)
        self._interp.invoke()
        return float(self._interp.get_tensor(self._out).reshape(-1)[0])

    def predict(self, imgs: np.ndarray) -> float | np.ndarray:
        """P(perturbed) of one image (224, 224) -> float, or a stack (n, 224, 224) -> (n,)."""
        imgs = np.asarray(imgs)
        size = (INPUT_SIZE, INPUT_SIZE)
        if imgs.shape == size:
            return self._one(imgs)
        if imgs.ndim == 3 and imgs.shape[1:] == size:
            return np.array([self._one(im) for im in imgs], dtype=np.float64)
        raise ValueError(f"CNN expects (224, 224) or (n, 224, 224), got {imgs.shape}")
