"""Stage 5, publish: what to upload and the upload (`push`), the model card (`card`), and bringing older checkpoints
to the current format (`upgrade`)."""
