"""``python -m fable.daemon [--system] [--socket PATH] [--log FILE] [--cluster URL]
[--listen ADDR:PORT]``: what
``fable daemon`` and the library's auto-start run (the library logs to
``$FABLE_STATE_DIR/fabled.log``, rotated). A refusal to start (a bad setting, the host id
another daemon's) is one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fable.daemon.server import serve, setup_logging
from fable.errors import FableError


def main() -> None:
    p = argparse.ArgumentParser(prog="fabled")
    p.add_argument("--system", action="store_true", help="serve every user of this host")
    p.add_argument("--socket", type=Path, default=None, help="listen here instead")
    p.add_argument("--log", type=Path, default=None, help="log here (rotated), not to stderr")
    p.add_argument("--cluster", default=None, help="join this cluster: zk://ADDR[:PORT][,...]/ROOT")
    p.add_argument("--listen", default=None, help="take other hosts' daemons here: ADDR:PORT")
    args = p.parse_args()
    setup_logging(args.log)
    try:
        serve(args.socket, system=args.system, cluster=args.cluster, listen=args.listen)
    except (FableError, ValueError) as e:
        logging.getLogger("fable.daemon").error("fabled refuses to start: %s", e)
        print(f"fabled: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # (not SIGINT/SystemExit: those are no error)
        logging.getLogger("fable.daemon").exception("fabled ended by an error")
        raise


if __name__ == "__main__":
    main()
