"""``python -m nuwa3dna.generate``: entry shim; the command lives in nuwa3dna.model.cli.generate (model/cli/generate.py)."""
import sys

from nuwa3dna.model.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
