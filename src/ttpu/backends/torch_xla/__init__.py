"""The torch_xla backend (PyTorch/XLA), an optional extra: ``pip install 'ttpu[torch_xla]'``."""
