"""Entry shim of ``python -m nuwa3dna.generate``: the command is model/cli/generate.py (nuwa3dna.model.cli.generate)."""
import sys

from nuwa3dna.model.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
