"""Runtime scoring of X-ray images for adversarial perturbations (no TensorFlow).

Modules, one job each: ``errors`` (typed refusals), ``preprocess`` (DICOM / PNG / JPEG to a
[0, 1] image at 224x224, with the header checks that keep hostile files from being decoded),
``features`` (image statistics for the forest), ``forest`` (a Random Forest as plain arrays),
``cnn`` (the CNN on LiteRT), ``bundle`` (verified model bundles), ``scoring`` (``Detector``:
stacking and the verdict) and ``cmd_score`` (``sentinel score``).

Importing this package loads nothing heavy; a ``Detector`` is not thread-safe, so use one per
worker thread.
"""
