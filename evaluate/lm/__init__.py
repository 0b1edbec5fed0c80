"""Language-model passes on held-out text: tokenised batches, the clean pass, forwards restarted from a
modified residual at layer L, and next-token statistics over the vocabulary in blocks."""
