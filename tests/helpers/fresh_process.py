"""The command line in a new interpreter, to see what its start-up imports."""

import os
import subprocess
import sys


def xmodal_in_fresh_process(argv: list[str]) -> tuple[list[str], bool]:
    """`xmodal ARGV` run by `xmodal.cli.main` in a new interpreter that must succeed: (its stdout
    lines, whether torch was imported)."""
    code = ("import sys; from xmodal.cli import main; "
            f"rc = main({list(map(str, argv))!r}); print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return lines[:-1], lines[-1] == "TORCH True"
