"""Built-in encoders of sparsecode. They register through the `sparsecode.encoders` entry points."""
