"""``python -m nuwa3dna {generate,train,evaluate} ...``: the app's commands (nuwa3dna.model.cli)."""
import sys

from nuwa3dna.model.cli import main

if __name__ == "__main__":
    sys.exit(main())
