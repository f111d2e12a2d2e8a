"""`python -m revati ...` runs the `revati` command (for environments where the package is not installed)."""

from revati.cli import main

main()
