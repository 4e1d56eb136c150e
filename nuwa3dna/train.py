"""Entry shim of ``python -m nuwa3dna.train``: the command is model/cli/train.py (nuwa3dna.model.cli.train)."""
import sys

from nuwa3dna.model.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
