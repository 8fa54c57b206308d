"""Training, attack and evaluation tools (needs the `train` extra: TensorFlow)."""
