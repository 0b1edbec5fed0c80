"""The sparse autoencoder (parameters, encode/decode, SAELens format), its contrastive head, and the layout of a
trained layer's directory with its writer and readers (train writes, evaluate and the API read)."""
