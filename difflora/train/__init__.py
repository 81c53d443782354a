"""Training loops and the pieces they share (output folders, checkpoints, loss, validation)."""
