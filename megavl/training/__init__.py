"""Training: the step, the loss, the optimizer and checkpoints."""
