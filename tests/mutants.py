"""``make mutants``: curated faults, each of which the fast suite must catch.

Each fault is one small edit of the source (a text that must stand exactly once in its file,
and what replaces it), named by the contract it breaks. For each, the tree is copied, the edit
applied (C faults rebuild the C core in the copy), and the fast suite (``-m "not slow"``) runs
against the copy until its first failure: the tests the fault names first (where it should be
caught), then the rest. A fault that no test catches is a survivor; the table says which test
caught each one, and the command exits 1 if any survived.

    python tests/mutants.py [NAME ...]     (all faults by default)

Not part of ``make test``: the 50 faults take about 10 minutes on 2 cores (longer for a fault
that survives: the whole fast suite runs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Fault:
    name: str
    contract: str  # what the fault breaks
    file: str  # relative to src/fable
    old: str
    new: str
    first: tuple[str, ...] = ()  # tests to run first (pytest node ids or -k expressions)


FAULTS = [
    Fault(
        "drop-a-message",
        "every message is delivered exactly once (one in 1000 vanishes, no sequence gap)",
        "transports/stream.py",
        "                seq = self._wseq\n                self._wseq = seq + 1\n"
        "                self._msgs_out += 1\n",
        "                seq = self._wseq\n                if self._msgs_out % 1000 == 999:\n"
        "                    self._msgs_out += 1\n                    return\n"
        "                self._wseq = seq + 1\n                self._msgs_out += 1\n",
        ("tests/test_conformance.py", "tests/test_model.py"),
    ),
    Fault(
        "deliver-twice",
        "no message is delivered twice (the reader keeps its position once)",
        "transports/stream.py",
        "        self._rpos = end\n        self._rseq = seq + 1\n        if flags & F_CLOSE:",
        "        if seq != 300 or getattr(self, '_again', False):\n"
        "            self._rpos = end\n            self._rseq = seq + 1\n"
        "        else:\n            self._again = True\n        if flags & F_CLOSE:",
        ("tests/test_conformance.py",),
    ),
    Fault(
        "accept-the-peers-form",
        "a side reads in place only if it trusts (it refuses an offer of unsafe reads)",
        "handshake.py",
        "    if not safe and not trusted:\n        raise PermissionDenied(",
        "    if False:\n        raise PermissionDenied(",
        ("tests/test_reconfig.py -k refusal", "tests/test_trust.py"),
    ),
    Fault(
        "take-any-transport",
        "a listener takes only the transport the daemon chose for it",
        "handshake.py",
        "    if stance.transport is not None and name != stance.transport:",
        "    if False:",
        ("tests/test_trust.py -k daemon_did_not",),
    ),
    Fault(
        "chain-of-proposals",
        "at most one old epoch not yet ended: a proposal while one is not over is refused",
        "epochs.py",
        "        old = self._unended(mine=True)\n",
        "        old = None\n",
        ("tests/test_trust.py -k chain",),
    ),
    Fault(
        "no-fragment-cap",
        "a message's fragments are capped in number (FABLE_MAX_FRAGMENTS), not only in bytes",
        "transports/message.py",
        "        if n > self._max_fragments:",
        "        if False:",
        ("tests/test_limits.py -k fragment_cap",),
    ),
    Fault(
        "recv-past-its-deadline",
        "recv(timeout) returns by its deadline while fragments keep coming",
        "transports/message.py",
        "        if n % CHECK_EVERY == 0 and timeout and deadline "
        "and time.monotonic() >= deadline:",
        "        if False:",
        ("tests/test_limits.py -k looks_at",),
    ),
    Fault(
        "skip-the-sequence-check",
        "a frame out of sequence fails the connection with ProtocolError",
        "transports/stream.py",
        "        if seq != self._rseq:",
        "        if False:",
        ("tests/test_hostile_stream.py",),
    ),
    Fault(
        "ignore-a-seal",
        "shared memory must be sealed against shrinking and growing before it is mapped",
        "transports/shm.py",
        "    if seals != SEALS:",
        "    if False:",
        ("tests/test_hostile_setup.py",),
    ),
    Fault(
        "peer-died-after-5s",
        "a peer killed while this side waits gives PeerDied within a second (shared memory "
        "has no fd to hang up: the wait checks the peer every slice)",
        "transports/mempipe.py",
        "FUTEX: 200_000_000, ADAPTIVE: 200_000_000}",
        "FUTEX: 5_000_000_000, ADAPTIVE: 5_000_000_000}",
        ("tests/test_conformance.py -k peer_died",),
    ),
    Fault(
        "never-wake-a-futex-waiter",
        "a sleeping side is woken when the other moves its position (futex doorbell)",
        "_core/wait.c",
        "    if (w & FR_WAIT_FUTEX) futex_wake(bell);",
        "    (void)futex_wake;",
        ("tests/test_doorbells.py",),
    ),
    Fault(
        "the-hot-path-never-waits",
        "a blocking recv on a ring waits in C within the call (no Python call)",
        "transports/mempipe.py",
        "self._rx.waits(mode, self._slice, self._spin, live, self._hints[1])",
        "self._rx.waits(-1, self._slice, self._spin, live, self._hints[1])",
        ("tests/test_hot_path.py",),
    ),
    Fault(
        "a-wait-in-c-never-looks-at-the-peer",
        "a peer that died is noticed by a wait in C within a slice (PeerDied < 1 s)",
        "_core/wait.c",
        "        if (r->live_fd >= 0 && live_news(r->live_fd)) return 0;",
        "        (void)live_news;",
        ("tests/test_conformance.py -k peer_died_reader",),
    ),
    Fault(
        "a-writer-waiting-for-room-is-never-woken",
        "the reader wakes a writer asleep for room once HEAD reaches what it waits for",
        "_core/wait.c",
        "    if (wanted && f == FR_WAIT_FUTEX && pos < __atomic_load_n(wanted, __ATOMIC_RELAXED)) "
        "return;",
        "    if (wanted && f == FR_WAIT_FUTEX) return;",
        ("tests/test_doorbells.py",),
    ),
    Fault(
        "forget-to-rearm-the-fileno",
        "fileno() signals again after getreadbuf() returned []",
        "transports/mempipe.py",
        "if out or self._epoll is None or self._rx.arm() is False:",
        "if out or self._epoll is None or True:",
        ("tests/test_conformance.py -k readiness", "tests/test_poll.py"),
    ),
    Fault(
        "the-buffer-fast-path-never-arms",
        "an empty getreadbuf in C arms readiness: fileno() signals when data comes",
        "_core/lend.c",
        "        if (!arm_event(self)) {",
        "        if ((void)arm_event, 1) {",
        ("tests/test_conformance.py -k readiness", "tests/test_poll.py"),
    ),
    Fault(
        "a-released-view-keeps-its-record",
        "releasing an unsafe read buffer gives its record back to the writer",
        "_core/lend.c",
        "                    if (release_at(self, pos) < 0) return NULL;",
        "                    (void)pos;",
        ("tests/test_api.py -k pin",),
    ),
    Fault(
        "a-refilled-copy-keeps-its-old-hash",
        "a safe read buffer's copy refilled in place hashes as its new content",
        "_core/lend.c",
        "    ((PyBytesObject *)b)->ob_shash = -1;",
        "    (void)b;",
        ("tests/test_api.py -k burst",),
    ),
    Fault(
        "a-held-copy-is-refilled",
        "a copy the application still holds is never refilled for another message",
        "_core/lend.c",
        "    if (size < SPARE_MIN || Py_REFCNT(bytes) != 1 ||",
        "    if (size < SPARE_MIN ||",
        ("tests/test_api.py -k burst",),
    ),
    Fault(
        "the-ring-wraps-in-python",
        "the C paths step over the padding at the ring's end",
        "_core/ring.c",
        "        if (flags != 0 && flags != FR_F_PAD) return 0;",
        "        if (flags != 0) return 0;",
        ("tests/test_hot_path.py -k wraps",),
    ),
    Fault(
        "a-buffer-commit-publishes-nothing",
        "commit(flush=True) makes the message visible to the reader at once",
        "_core/lend.c",
        "                if (flush) do_publish(self);",
        "                (void)flush;",
        ("tests/test_hot_path.py -k buffer",),
    ),
    Fault(
        "lose-messages-at-the-end-of-an-epoch",
        "nothing is lost at a close or the end of an epoch: END follows every message",
        "transports/stream.py",
        "        if not self._end_queued:\n            self._claims = deque(",
        "        if not self._end_queued:\n            self._queue.clear()\n"
        "            self._queued = 0\n            self._claims = deque(",
        ("tests/test_conformance.py -k close_flushes", "tests/test_reconfig.py -k kept_back"),
    ),
    Fault(
        "release-frees-the-wrong-extent",
        "a read buffer's release returns its own extent to the writer",
        "transports/shmem_pipe.py",
        "            return\n        self._rets += _pack_ret(off, n)",
        "            return\n        self._rets += _pack_ret(off + 64, n)",
        ("tests/test_conformance.py -k shmem",),
    ),
    Fault(
        "another-uid-takes-a-name",
        "a name belongs to the uid that registered it",
        "daemon/registry.py",
        "            if old.uid != ep.uid:\n                raise PermissionDenied(",
        "            if False:\n                raise PermissionDenied(",
        ("tests/test_daemon.py -k uid",),
    ),
    Fault(
        "tail-out-of-range-accepted",
        "a ring position from the peer is range-checked (TAIL never more than a ring ahead)",
        "_core/ring.c",
        "    if (tail < r->tail_cache || tail - r->head > r->cap) {",
        "    if (tail < r->tail_cache) {",
        ("tests/test_hostile_shm.py -k tail", "tests/test_ring.py"),
    ),
    Fault(
        "dead-buffer-still-usable",
        "a Buffer is single-use: its data raises DeadBuffer after release",
        "buffer.py",
        "        data = self._data\n        if data is None:\n            raise DeadBuffer("
        '"buffer was already committed, released or aborted")\n        return data',
        "        return self._data  # type: ignore[return-value]",
        ("tests/test_conformance.py -k dead_buffer", "tests/test_api.py"),
    ),
    Fault(
        "recv-into-loses-the-message",
        "recv_into with a buffer too small loses nothing",
        "transports/message.py",
        "        if total > len(out):\n            raise ValueError(",
        "        if total > len(out):\n            self._stash = []\n            raise ValueError(",
        ("tests/test_conformance.py -k recv_into",),
    ),
    Fault(
        "timeout-zero-waits",
        "timeout=0 never waits: WouldBlock",
        "transports/message.py",
        "    if timeout == 0:\n        raise WouldBlock(full)\n    if deadline is None:",
        "    if deadline is None:",
        ("tests/test_conformance.py -k backpressure",),
    ),
    Fault(
        "spin-beside-the-peer",
        "the policy never picks a spinning transport for ends that could share a core",
        "policy.py",
        "    if caps.spins and not facts.apart:",
        "    if caps.spins and False:",
        ("tests/test_policy.py",),
    ),
    Fault(
        "no-close-frame",
        "a clean close is ConnectionClosed after every message, not PeerDied",
        "transports/message.py",
        "            if held and self._error is None and not self._wended:\n"
        "                self._say_goodbye(linger)",
        "            pass",
        ("tests/test_conformance.py -k clean_close",),
    ),
    Fault(
        "oversized-frame-accepted",
        "a control frame over its protocol's limit is a ProtocolError",
        "_wire.py",
        "        if n > self.max_frame:",
        "        if False:",
        ("tests/test_setup.py", "tests/test_daemon.py -k malformed"),
    ),
    Fault(
        "report-without-the-token",
        "a flow's reports must hold its secret token (another uid cannot hijack it)",
        "daemon/registry.py",
        '            if not _same(str(f.get("token", "")), flow.token):',
        "            if False:",
        ("tests/test_local_users.py -k report_or_switch", "tests/test_daemon_limits.py"),
    ),
    Fault(
        "show-other-users-pids",
        "another user's endpoints show no pid or placement, their flows not at all",
        "daemon/server.py",
        "                if self._sees_all(client, ep.uid):",
        "                if True:",
        ("tests/test_local_users.py -k hidden",),
    ),
    Fault(
        "no-per-uid-connection-limit",
        "another uid is refused past FABLE_MAX_CONNS_PER_UID",
        "daemon/server.py",
        "        if uid != self.uid and n >= cfg.max_conns_per_uid:",
        "        if False:",
        ("tests/test_local_users.py -k per_uid",),
    ),
    Fault(
        "accept-loop-ends-at-emfile",
        "out of fds, the daemon backs off and goes on accepting",
        "daemon/server.py",
        "                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, "
        "errno.ENOMEM):",
        "                if True:",
        ("tests/test_daemon_limits.py -k out_of_fds",),
    ),
    Fault(
        "names-free-during-a-restart",
        "after a restart, a name stays reserved for its uid for FABLE_RESTART_GRACE",
        "daemon/registry.py",
        "        if held is not None and held != ep.uid:",
        "        if False:",
        ("tests/test_local_users.py -k restart",),
    ),
    Fault(
        "cluster-claim-skipped",
        "a name is unique across the cluster: a register claims it in ZooKeeper first",
        "daemon/cluster.py",
        '        if self.state != "connected" or not self.joined:\n            return\n'
        "        self.claiming.add(name)",
        "        if True:\n            return\n        self.claiming.add(name)",
        ("tests/test_cluster_tier.py -k one_winner",),
    ),
    Fault(
        "cluster-live-host-id-taken",
        "a daemon refuses a host id a live daemon holds",
        "daemon/cluster.py",
        '        if pid == os.getpid() or _start_time(pid) != info["start"]:',
        "        if True:",
        ("tests/test_cluster_tier.py -k host_id",),
    ),
    Fault(
        "cluster-persistent-znode-listed",
        "a persistent znode is no daemon's: the cache ignores it",
        "daemon/cluster.py",
        "            if stat.ephemeralOwner == 0:\n                raise _Bad(",
        "            if False:\n                raise _Bad(",
        ("tests/test_cluster_tier.py -k bad_znodes",),
    ),
    Fault(
        "cluster-zxid-kept",
        "a ZooKeeper back with an empty data dir takes the daemons back (they forget its zxid)",
        "daemon/cluster.py",
        "            zk.last_zxid = 0",
        "            pass",
        ("tests/test_cluster_tier.py -k zookeeper_down",),
    ),
    Fault(
        "cluster-vandalised-znode-left",
        "a daemon puts back its znodes that another client deleted or wrote over",
        "daemon/cluster.py",
        "        if ours is None or (\n",
        "        if True or (\n",
        ("tests/test_cluster_tier.py -k overwritten",),
    ),
    Fault(
        "across-join-token-unchecked",
        "a listening process admits only the caller that holds its daemon's token (T1)",
        "transports/across.py",
        '        if record.get("op") != JOIN or not _same(record.get("token"), '
        'str(remote["token"])):\n',
        '        if record.get("op") != JOIN:\n',
        ("tests/test_across_hosts.py -k replayed",),
    ),
    Fault(
        "across-peer-token-unchecked",
        "a connecting process refuses what answers without the other daemon's token (T2)",
        "transports/across.py",
        '            if record.get("op") != JOINED or not _same(record.get("token"), '
        'remote["peer_token"]):\n',
        '            if record.get("op") != JOINED:\n',
        ("tests/test_across_hosts.py -k does_not_hold",),
    ),
    Fault(
        "across-dial-token-unchecked",
        "a data connection between hosts is taken by its token only",
        "transports/across.py",
        '            lambda r: r.get("op") == DIAL and _same(r.get("token"), token),\n',
        '            lambda r: r.get("op") == DIAL,\n',
        ("tests/test_across_hosts.py -k taken_by_its_token",),
    ),
    Fault(
        "link-caller-address-unchecked",
        "a daemon takes a remote-connect only from an address of the host it names",
        "daemon/server.py",
        "        if peer not in self.cluster.addresses_of(host):\n",
        "        if False:\n",
        ("tests/test_across_hosts.py -k another_hosts_name",),
    ),
    Fault(
        "listener-takes-every-host",
        "a listener takes other hosts only with allow_remote or allow_hosts",
        "daemon/server.py",
        "                if not ep.takes_host(host):\n",
        "                if False:\n",
        ("tests/test_across_hosts.py -k does_not_allow",),
    ),
    Fault(
        "pair-beside-a-stranger",
        "fable run pairs a connection only if every listener that could take it is a fable-run "
        "one (a listener outside fable on the port would get a connection it cannot read)",
        "daemon/ports.py",
        "        if not all(i in self.registered for i in found):\n",
        "        if not any(i in self.registered for i in found):\n",
        ("tests/test_run_hostile.py",),
    ),
    Fault(
        "accept-any-peer",
        "a pair goes only to the socket the asking one is connected to (addresses, namespace)",
        "daemon/ports.py",
        "                same = _addr(p.tcp.getpeername()) == here == p.to and _netns(sock) == "
        "_netns(p.tcp)\n",
        "                same = True\n",
        ("tests/test_run_hostile.py",),
    ),
    Fault(
        "trust-any-daemon",
        "the LD_PRELOAD library speaks only to a daemon of its own user or root",
        "_shim/shim.c",
        "        (cred.uid != getuid() && cred.uid != 0))",
        "        0)",
        ("tests/test_run_hostile.py",),
    ),
    Fault(
        "swap-under-epoll",
        "a socket already in an epoll set when it connects stays TCP",
        "_shim/shim.c",
        "    if (in_epoll(fd)) {",
        "    if (0) {",
        ("tests/test_run.py",),
    ),
]


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files"],  # docs and README too: tests check them
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    for so in (ROOT / "src" / "fable").rglob("*.so"):  # the built C extensions
        target = dst / so.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, target)


def _build_core(tree: Path) -> None:
    """Rebuild fable._core in ``tree`` (the same flags as pyproject.toml's)."""
    core = tree / "src" / "fable" / "_core"
    out = tree / "src" / "fable" / ("_core" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = [
        "gcc",
        "-shared",
        "-fPIC",
        "-O2",
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{core}",
        *(str(c) for c in sorted(core.glob("*.c"))),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)


def _build_shim(tree: Path) -> None:
    """Rebuild fable run's LD_PRELOAD library in ``tree`` (pyproject.toml's flags)."""
    src = tree / "src" / "fable" / "_shim" / "shim.c"
    out = tree / "src" / "fable" / ("_shim" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-std=gnu11", "-Wall", "-Wextra"]
    subprocess.run([*cmd, str(src), "-o", str(out), "-ldl"], check=True, capture_output=True)


def _pytest(tree: Path, args: list[str], timeout: float) -> tuple[bool, str]:
    """Run pytest on the copy; (caught, the first failing test or why)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        *args,
    ]
    try:
        out = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return True, f"the suite ran past {timeout:.0f} s (a hang)"
    text = out.stdout + out.stderr
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", text, re.M)  # ids may have spaces
    if out.returncode == 0:
        return False, ""
    if failed:
        return True, failed.group(1)
    if out.returncode == 5:  # no tests collected by this selection
        return False, ""
    return True, f"pytest exit status {out.returncode}"


def _confirmed(test: str, timeout: float) -> bool:
    """Whether ``test`` (a node id) passes on the unchanged tree: a test that fails without
    the fault (a flaky one) caught nothing."""
    if "::" not in test:
        return True  # a hang or a crash of the whole run: nothing to re-run
    caught, _ = _pytest(ROOT, [test], timeout)
    return not caught


def run(fault: Fault, timeout: float) -> tuple[bool, str, float]:
    t0 = time.monotonic()
    caught, why = _run_fault(fault, timeout)
    if caught and not _confirmed(why, timeout):
        caught, why = False, f"only by {why}, which fails without the fault too"
    return caught, why, time.monotonic() - t0


def _run_fault(fault: Fault, timeout: float) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix=f"fable-mutant-{fault.name}-") as d:
        tree = Path(d)
        _copy_tree(tree)
        path = tree / "src" / "fable" / fault.file
        text = path.read_text()
        if text.count(fault.old) != 1:
            raise SystemExit(
                f"{fault.name}: the text to replace stands {text.count(fault.old)} "
                f"times in {fault.file} (must be once): update the fault"
            )
        path.write_text(text.replace(fault.old, fault.new))
        if fault.file.startswith("_core/"):
            _build_core(tree)
        if fault.file.startswith("_shim/"):
            _build_shim(tree)
        for first in fault.first:
            parts = first.split(" -k ")
            args = [parts[0]] + (["-k", parts[1]] if len(parts) > 1 else [])
            caught, why = _pytest(tree, args, timeout)
            if caught:
                return True, why
        return _pytest(tree, ["tests"], timeout)


def main() -> int:
    wanted = set(sys.argv[1:])
    faults = [f for f in FAULTS if not wanted or f.name in wanted]
    if wanted - {f.name for f in faults}:
        raise SystemExit(f"unknown faults: {sorted(wanted - {f.name for f in faults})}")
    rows = []
    for f in faults:
        caught, why, took = run(f, timeout=900.0)
        rows.append((f, caught, why, took))
        print(
            f"{f.name:<38} {'caught by ' + why if caught else 'SURVIVED ' + why:<70} {took:5.0f} s",
            flush=True,
        )
    survivors = [f.name for f, caught, _, _ in rows if not caught]
    print()
    print("| fault | contract it breaks | caught by |")
    print("|---|---|---|")
    for f, caught, why, _ in rows:
        print(f"| {f.name} | {f.contract} | {why if caught else '**survived**'} |")
    print()
    print(
        f"{len(rows) - len(survivors)} of {len(rows)} faults caught"
        + (f"; survivors: {', '.join(survivors)}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
