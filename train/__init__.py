"""Stage 2: train one Contrastive Sparse Autoencoder per layer on a harvested store."""
