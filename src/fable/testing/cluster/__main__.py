"""``python -m fable.testing.cluster sweep|demo``: remove the namespaces earlier runs left
(``sweep``), or show the cluster tier, connections between hosts and their failures on three
test hosts (``demo``, exit 0 when every bound holds)."""

from __future__ import annotations

import sys

from fable.testing.cluster import sweep
from fable.testing.cluster.demo import demo


def main(argv: list[str]) -> int:
    if argv == ["sweep"]:
        for ns in sweep():
            print(f"removed {ns}")
        return 0
    if argv == ["demo"]:
        return demo()
    print("usage: python -m fable.testing.cluster sweep|demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
