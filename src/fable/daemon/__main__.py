"""``python -m fable.daemon [--system] [--socket PATH] [--log FILE]``: what ``fable daemon`` and
the library's auto-start run (the library logs to ``$FABLE_STATE_DIR/fabled.log``, rotated)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fable.daemon.server import serve, setup_logging


def main() -> None:
    p = argparse.ArgumentParser(prog="fabled")
    p.add_argument("--system", action="store_true", help="serve every user of this host")
    p.add_argument("--socket", type=Path, default=None, help="listen here instead")
    p.add_argument("--log", type=Path, default=None, help="log here (rotated), not to stderr")
    args = p.parse_args()
    setup_logging(args.log)
    try:
        serve(args.socket, system=args.system)
    except Exception:  # (not SIGINT/SystemExit: those are no error)
        logging.getLogger("fable.daemon").exception("fabled ended by an error")
        raise


if __name__ == "__main__":
    main()
