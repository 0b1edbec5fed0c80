"""Stage 1: run the language model once over a corpus and cache residual-stream activations."""
