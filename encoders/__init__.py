"""Built-in encoders of sparsecode, installed as the import package `sparsecode_encoders` (the folder is
`encoders/`). They register through the `sparsecode.encoders` entry points, as a third-party plug-in would."""
