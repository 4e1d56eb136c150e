"""Entry shim of ``python -m nuwa3dna.evaluate``: the command is model/cli/evaluate.py (nuwa3dna.model.cli.evaluate)."""
import sys

from nuwa3dna.model.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
