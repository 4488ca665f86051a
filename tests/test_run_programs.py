"""``fable run`` with real, unmodified programs (Debian's redis, nginx, socat, curl, wrk and
CPython's http.server; ``make test`` installs them): what they serve is byte-identical, every
request answered, and the connections are the daemon's flows."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fable.bench import programs
from fable.run import environment
from helpers import wait_for

pytestmark = pytest.mark.slow
PEER = str(Path(__file__).with_name("fablerun_peer.py"))
SWAPPED = "carried by a unix socket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), 1):
            return True
    except OSError:
        return False


def _fable_env(name: str) -> dict[str, str]:
    return {**environment(name), "FABLE_RUN_DEBUG": "1"}


@pytest.fixture
def body(tmp_path: Path) -> tuple[Path, str]:
    site = tmp_path / "site"
    site.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (site / "blob").write_bytes(data)
    site.chmod(0o755)
    tmp_path.chmod(0o755)
    return site, hashlib.sha256(data).hexdigest()


def _curl(url: str, fable: bool) -> tuple[str, str]:
    """sha256 of the body curl fetched, and its stderr (the library's lines under fable)."""
    done = subprocess.run(
        ["curl", "-sS", "-g", "--max-time", "60", url],
        env=_fable_env("curl") if fable else None,
        capture_output=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return hashlib.sha256(done.stdout).hexdigest(), done.stderr.decode()


def test_http_server_and_curl(daemon: Path, body: tuple[Path, str]) -> None:
    site, digest = body
    port = _free_port()
    # on :: (dual stack): 127.0.0.1 (an IPv4-mapped peer), localhost and ::1 all reach it
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "::", "--directory", str(site)],
        env=_fable_env("http-server"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _answers(port), 20)
        for host in ("127.0.0.1", "localhost", "[::1]"):
            url = f"http://{host}:{port}/blob"
            got, err = _curl(url, fable=True)
            assert got == digest and SWAPPED in err, (host, err)
            assert _curl(url, fable=False)[0] == digest  # a plain client still gets TCP
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert err.count(f"accepted a connection: {SWAPPED}") >= 3, err
    # and a fable-run curl against a plain server: TCP, the same bytes
    port = _free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as plain:
        try:
            wait_for(lambda: _answers(port), 20)
            got, err = _curl(f"http://127.0.0.1:{port}/blob", fable=True)
            assert got == digest and SWAPPED not in err
        finally:
            plain.terminate()


NGINX_CONF = """
worker_processes 2;
daemon off;
master_process on;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {site};
    }}
}}
"""


def test_nginx_answers_every_request(daemon: Path, body: tuple[Path, str], tmp_path: Path) -> None:
    site, digest = body
    (site / "small").write_bytes(b"x" * 4096)
    port = _free_port()
    d = tmp_path / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port, site=site))
    nginx = subprocess.Popen(
        ["nginx", "-c", str(conf), "-e", str(d / "error.log")],
        env=_fable_env("nginx"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _answers(port), 20)
        # 1,000 requests from one fable-run curl (kept-alive and fresh connections alike)
        urls = d / "urls"
        one = f'url = "http://127.0.0.1:{port}/small"\noutput = "/dev/null"\n'
        urls.write_text(one * 1000)
        done = subprocess.run(
            ["curl", "-sS", "-w", "%{http_code}\\n", "-K", str(urls)],
            env=_fable_env("curl"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["200"] * 1000
        assert SWAPPED in done.stderr
        # sendfile of a large file over the unix socket: the same bytes
        got, err = _curl(f"http://127.0.0.1:{port}/blob", fable=True)
        assert got == digest and SWAPPED in err
        # wrk: many connections, every response 2xx
        done = subprocess.run(
            ["wrk", "-t2", "-c20", "-d2s", f"http://127.0.0.1:{port}/small"],
            env=_fable_env("wrk"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        total = int(re.search(r"(\d+) requests in", done.stdout).group(1))  # type: ignore[union-attr]
        assert total >= 1000 and "Non-2xx" not in done.stdout and "Socket errors" not in done.stdout
        assert done.stderr.count(SWAPPED) >= 20, done.stderr[-2000:]
    finally:
        nginx.terminate()
        nginx.communicate(timeout=30)


def test_socat_half_close(daemon: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, PEER, "serve"], env=environment("peer"), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        import json

        port = json.loads(server.stdout.readline())["port"]
        data = os.urandom(200_000)
        done = subprocess.run(
            ["socat", "-t", "30", "-", f"TCP:127.0.0.1:{port}"],
            input=data,
            env=_fable_env("socat"),
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == data[::-1]  # socat shut down writing at EOF; the reply came back
        assert SWAPPED in done.stderr.decode()
        assert json.loads(server.stdout.readline())["kind"] == "unix"
    finally:
        server.kill()
        server.communicate()


@pytest.fixture
def redis_port(daemon: Path, tmp_path: Path) -> Iterator[int]:
    port = _free_port()
    tmp_path.chmod(0o755)
    with programs.redis_server(port, str(tmp_path / "r.sock"), dir=str(tmp_path)):
        yield port


def _redis(port: int, *args: str, fable: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        env=_fable_env("redis-cli") if fable else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_redis_fork_threads_and_client_list(redis_port: int) -> None:
    port = redis_port
    listed = _redis(port, "client", "list")
    assert SWAPPED in listed.stderr and "addr=127.0.0.1:" in listed.stdout
    bench = subprocess.Popen(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "set,get",
            "-n",
            "200000",
            "-c",
            "50",
            "--threads",
            "2",
            "-q",
        ],
        env=environment("redis-benchmark"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        saved = _redis(port, "bgsave")  # redis forks with every client's fd
        assert "Background saving started" in saved.stdout, saved
        out, err = bench.communicate(timeout=300)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
    assert bench.returncode == 0, err
    rates = dict(re.findall(r"([A-Z]+): ([0-9.]+) requests per second", out.replace("\r", "\n")))
    assert set(rates) == {"SET", "GET"}
    wait_for(lambda: "rdb_bgsave_in_progress:0" in _redis(port, "info", "persistence").stdout, 30)
    assert "rdb_last_bgsave_status:ok" in _redis(port, "info", "persistence").stdout


@pytest.mark.timeout(150)
def test_readme_example(daemon: Path, tmp_path: Path) -> None:
    """The README's `fable run` block, run by bash as printed (`fable` on PATH, as the README's
    set-up says); every command in it must succeed."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("## Unmodified programs")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None and "fable run -- redis-server" in block.group(1)
    script = "set -e\n" + block.group(1) + "wait\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as sh:
        try:
            out, err = sh.communicate(timeout=100)
        finally:  # what it started in the background goes too, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sh.pid, signal.SIGKILL)
            if sh.poll() is None:
                sh.wait()
    assert sh.returncode == 0, out[-3000:] + err[-3000:]
    assert re.search(r"sub <-> port/16379 +unix", out), out  # fable flows
    assert "carried by a unix socket" in err and "fable/unix" in out


def test_redis_benchmark_three_ways_once(daemon: Path) -> None:
    """The acceptance bench's machinery, one small round: every connection a flow, and TCP
    carries only the rendezvous."""
    result = programs.redis(rounds=1, requests=20_000, clients=50, port=_free_port())
    assert result["flows"] >= 50 and result["client_addr"]
    runs = {r["way"]: r for r in result["runs"]}
    assert runs["fable"]["out_segs"] < 50 * 2 * 20  # (two tests, each 50 connections)
    assert runs["tcp"]["out_segs"] > 20_000
    assert runs["unix"]["out_segs"] < 1000
    assert "fable/unix" in programs.table(result)
