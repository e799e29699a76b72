"""Training: ``ttpu.Trainer`` and ``ttpu.TrainingArguments`` (transformers' semantics, one
compiled JAX step, ZeRO over the mesh, orbax checkpoints, PEFT adapters)."""
