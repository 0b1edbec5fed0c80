"""What more than one stage needs, at the bottom of the project (it imports no stage): configs (config/), the
activation store (store/), the language model and corpora (lm/), the SAE, its head and checkpoint layout (sae/),
the device/dtype policy, safe files and locks, and what entry points read from the environment."""
