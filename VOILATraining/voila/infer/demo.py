"""``python -m voila.infer.demo``: the old spelling of ``voila demo`` (kept so scripts keep working)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from voila.cli import main as cli_main

    print("note: 'python -m voila.infer.demo' is now 'voila demo'", file=sys.stderr)
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
