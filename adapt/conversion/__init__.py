"""Stage 1, convert: a causal source (directory, GGUF file, Hub id) into a diffusion checkpoint (`convert`), with one
row of facts per architecture (`architectures`)."""
