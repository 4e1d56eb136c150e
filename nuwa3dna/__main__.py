"""``python -m nuwa3dna {generate,train,evaluate} ...``: one entry point for the three commands."""
import sys

COMMANDS = ("generate", "train", "evaluate")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        print(f"error: expected a command, one of {', '.join(COMMANDS)}; got {got} "
              f"(e.g. python -m nuwa3dna generate --task t2v)", file=sys.stderr)
        return 2
    if argv[0] == "generate":
        from .generate import main as run
    elif argv[0] == "train":
        from .train import main as run
    else:
        from .evaluate import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
