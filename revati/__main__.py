"""`python -m revati ...` runs the `revati` command (for environments where the package is not installed)."""

from revati.cli import main

if __name__ == "__main__":  # not when a process pool re-imports the parent's main module
    main()
