"""Entry point for `python -m mlxft`."""

from mlxft.cli import main

main()
