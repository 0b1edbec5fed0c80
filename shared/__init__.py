"""What more than one stage needs: configs, the model and corpus registries, the store schema, the SAE and
head modules, the checkpoint layout and the rule that cuts documents into sequences."""
