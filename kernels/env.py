"""Process settings the backends read (no torch state is changed here)."""
import os


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``, read at import by Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
