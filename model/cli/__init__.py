"""The app's command lines: ``python -m nuwa3dna {generate,train,evaluate} ...``.

generate.py runs one task, train.py (+ train_stages.py) trains the three
stages, evaluate.py scores a checkpoint with the pixel oracle; common.py holds
what they share (the one-line parser, the error wrapper, the checkpoint loader,
the task table). ``nuwa3dna/{generate,train,evaluate}.py`` are entry shims
that call these ``main`` functions.
"""
import importlib
import sys

COMMANDS = ("generate", "train", "evaluate")


def main(argv=None) -> int:
    """Dispatch ``COMMAND ARGS...`` to ``nuwa3dna.model.cli.COMMAND.main(ARGS)``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        print(f"error: expected a command, one of {', '.join(COMMANDS)}; got {got} "
              f"(e.g. python -m nuwa3dna generate --task t2v)", file=sys.stderr)
        return 2
    return importlib.import_module(f"nuwa3dna.model.cli.{argv[0]}").main(argv[1:])
