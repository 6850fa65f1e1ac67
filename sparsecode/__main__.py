"""``python -m sparsecode``: the `sparsecode` command (also under ``torchrun ... -m sparsecode``)."""
from .cli import main

main()
