"""``python -m nuwa3dna.train``: entry shim; the command lives in nuwa3dna.model.cli.train (model/cli/train.py)."""
import sys

from nuwa3dna.model.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
