"""``fable run [--name N] -- CMD ARGS...``: run an unmodified program (native or Python) with
fable's LD_PRELOAD library (``src/fable/_shim/shim.c``, built by ``pip install`` as the shared
object ``fable/_shim*.so``), so that a loopback TCP connection between two programs run this
way is carried by a unix socket; the daemon pairs them (``daemon/ports.py``) and lists each
such connection as a flow.

Contract:
- A per-user daemon is started if none answers, as ``fable.register`` does. If none can be
  reached, the program still runs: every connection stays TCP.
- The program is exec'd in this process: its exit status, signals and stdio are its own.
- A program the dynamic loader will not preload into (a static binary, a setuid or setgid one)
  runs as usual, over TCP, after a warning on stderr.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import NoReturn

from fable.client import socket_path, start_daemon
from fable.errors import FableError

__all__ = ["environment", "not_preloadable", "run", "shim_path"]

_PT_INTERP = 3


def shim_path() -> Path:
    """The LD_PRELOAD library built with this fable (``FableError`` if it was not built)."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_shim{suffix}"
        if p.is_file():
            return p
    raise FableError(f"fable's LD_PRELOAD library is not built in {here}: reinstall fable")


def _dynamic_elf(path: Path) -> bool | None:
    """Whether an ELF file asks for a program interpreter (a dynamic executable); None: it
    is not an ELF file."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2):
            return None
        end = "<" if head[5] == 1 else ">"
        if head[4] == 2:
            phoff, phentsize, phnum = struct.unpack_from(end + "Q14xHH", head, 32)
        else:
            phoff, phentsize, phnum = struct.unpack_from(end + "I10xHH", head, 28)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (kind,) = struct.unpack(end + "I", f.read(4))
            if kind == _PT_INTERP:
                return True
    return False


def not_preloadable(cmd: str) -> str | None:
    """Why the dynamic loader will not preload a library into ``cmd`` (resolved on PATH), or
    None. A script is judged by the interpreter its ``#!`` line names."""
    found = shutil.which(cmd)
    if found is None:
        return None  # (exec fails the same way with or without fable)
    path = Path(found)
    st = path.stat()
    if st.st_mode & 0o6000:
        return f"{path} is setuid or setgid: the dynamic loader ignores LD_PRELOAD for it"
    with open(path, "rb") as f:
        first = f.read(256)
    if first.startswith(b"#!"):
        words = first[2:].split(b"\n")[0].split()
        return not_preloadable(os.fsdecode(words[0])) if words else None
    if _dynamic_elf(path) is False:
        return f"{path} is statically linked: nothing can be preloaded into it"
    return None


def environment(name: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a program under ``fable run`` (starting a daemon if none runs);
    ``base``: the environment to add to (default: this process's)."""
    env = dict(os.environ if base is None else base)
    path, may_start = socket_path()
    if may_start:
        try:
            start_daemon(path)
        except (FableError, OSError) as e:
            print(f"fable run: no daemon ({e}); connections stay TCP", file=sys.stderr)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = str(shim_path()) + (":" + preload if preload else "")
    env["FABLE_RUN_SOCKET"] = str(path)
    if name:
        env["FABLE_RUN_NAME"] = name
    return env


def run(argv: list[str], name: str | None = None) -> NoReturn:
    """Exec ``argv`` under ``fable run`` (never returns; exit 127 if it cannot be run)."""
    why = not_preloadable(argv[0])
    if why:
        print(f"fable run: {why}; {argv[0]} runs over plain TCP", file=sys.stderr)
    env = environment(name)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"fable run: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        sys.exit(127)
