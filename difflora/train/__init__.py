"""Training loops and the pieces they share (checkpoints, loss, validation, class images)."""
