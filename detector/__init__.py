"""Runtime scoring of X-ray images for adversarial perturbations (no TensorFlow)."""
