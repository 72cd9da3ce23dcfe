"""python -m bench <suite> [args...]: run one benchmark suite (a module bench/<suite>.py with main(argv))."""
from __future__ import annotations

import importlib
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m bench <suite> [args]", file=sys.stderr)
        return 2
    suite = sys.argv[1]
    try:
        mod = importlib.import_module(f"bench.{suite}")
    except ModuleNotFoundError:
        print(f"no benchmark suite {suite!r} (bench/{suite}.py)", file=sys.stderr)
        return 2
    return int(mod.main(sys.argv[2:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
