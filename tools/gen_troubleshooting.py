"""Regenerate README.md's Troubleshooting table from the cases in tests/cli/test_reliability.py.

    python tools/gen_troubleshooting.py          # rewrite the table between the markers
    python tools/gen_troubleshooting.py --check  # exit 1 when README.md is out of date

Only the text between ``<!-- troubleshooting:start -->`` and ``<!-- troubleshooting:end -->``
is touched. The same cases are run as tests, so every row is checked against the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli.test_reliability import (  # noqa: E402
    END,
    README,
    START,
    readme_section,
    render_troubleshooting,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check; exit 1 when the table is out of date")
    args = parser.parse_args(argv)
    text = README.read_text()
    table = render_troubleshooting()
    if readme_section(text) == table:
        print(f"{README.name}: Troubleshooting table is up to date")
        return 0
    if args.check:
        print(f"{README.name}: Troubleshooting table is out of date; run "
              "python tools/gen_troubleshooting.py", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{table}{END}{tail}")
    print(f"{README.name}: Troubleshooting table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
