"""``python -m nuwa3dna.evaluate``: entry shim; the command lives in nuwa3dna.model.cli.evaluate (model/cli/evaluate.py)."""
import sys

from nuwa3dna.model.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
