"""The style budget (/work/shared/reference/aesthetics.md §9.1): list files over 400 lines and functions over 60.

    python scripts/check_sizes.py [PATH ...]   # default: the package, tests, bench, converters, scripts

Lines are newlines from `def` to the function's last line (nested functions and methods included), as the
reference note measures them. Exits 1 when anything is over budget, so `make lint` can run it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
DEFAULT_ROOTS = ("trtllm_peft", "tests", "bench", "converters", "scripts")


def over_budget(path: Path) -> list[str]:
    """One line per file or function in `path` that is over budget."""
    text = path.read_text()
    out = []
    if (n := text.count("\n")) > MAX_FILE_LINES:
        out.append(f"{path}: file {n} lines > {MAX_FILE_LINES}")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                out.append(f"{path}:{node.lineno}: function {node.name} {n} lines > {MAX_FUNCTION_LINES}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path(r) for r in DEFAULT_ROOTS])
    args = parser.parse_args(argv)
    files = [f for p in args.paths for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    problems = [line for f in files for line in over_budget(f)]
    print("\n".join(problems) or f"{len(files)} files within budget")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
