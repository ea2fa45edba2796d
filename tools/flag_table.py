"""Regenerate the README's command-line reference (flag tables) from the argparse parsers.

    python tools/flag_table.py           # rewrite README.md's generated block
    python tools/flag_table.py --check   # exit 1 (and say so) when README.md is out of date

``tests/test_cli_flags.py`` runs the same check, so a flag added to a command without rerunning this
fails the tests.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from raydn.commands._reference import flag_tables, readme_block, update_readme  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when out of date")
    args = ap.parse_args(argv)
    if args.check:
        ok = readme_block(Path(args.readme).read_text(encoding="utf-8")) == flag_tables()
        print(f"{args.readme}: command-line reference " + ("up to date" if ok else
              "OUT OF DATE: run python tools/flag_table.py"))
        return 0 if ok else 1
    changed = update_readme(args.readme)
    print(f"{args.readme}: command-line reference " + ("rewritten" if changed else "already up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
