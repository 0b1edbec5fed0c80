"""The language model side shared by harvest and evaluate: the model registry, the residual-stream hook, the
corpus registry and the rule that cuts documents into sequences; and a tiny stand-in model for tests."""
