"""One module per metric family. The store families (reconstruction, contrastive with disentanglement, topic)
read the store's held-out rows (heldout.py; composed per layer in store.py); downstream and unlearning run the
language model."""
