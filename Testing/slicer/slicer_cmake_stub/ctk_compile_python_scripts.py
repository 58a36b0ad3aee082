"""Byte-compile scripts the way CTK's generated compile script does: ``<script>.pyc`` beside each.

Usage: ``python ctk_compile_python_scripts.py <stamp file> <script.py>...``; a script that does not
compile fails the build, and the stamp is written only when all of them compiled.
"""

from __future__ import annotations

import py_compile
import sys
from pathlib import Path


def main(stamp: str, scripts: list[str]) -> int:
    for script in scripts:
        try:
            py_compile.compile(script, cfile=script + "c", doraise=True)
        except py_compile.PyCompileError as error:
            print(error.msg, file=sys.stderr)
            return 1
    Path(stamp).write_text("Done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
