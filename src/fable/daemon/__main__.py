"""``python -m fable.daemon [--system] [--socket PATH]``: what ``fable daemon`` and the
library's auto-start run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fable.daemon.server import serve


def main() -> None:
    p = argparse.ArgumentParser(prog="fabled")
    p.add_argument("--system", action="store_true", help="serve every user of this host")
    p.add_argument("--socket", type=Path, default=None, help="listen here instead")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fabled %(message)s")
    serve(args.socket, system=args.system)


if __name__ == "__main__":
    main()
