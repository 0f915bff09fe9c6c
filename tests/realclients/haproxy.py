"""Debian's HAProxy in front of one or more nodes, with a configuration written by the test:
DIMSE in TCP mode (leastconn, PROXY protocol v2 to the nodes when asked), DICOMweb in HTTP
mode (X-Forwarded-For), both health-checked on each node's `/healthz`, and an admin socket
to read server states and drain a server. The balancer connects to the nodes from `source`
(another loopback address), so a node can tell the balancer's connections from a client's."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port, wait_until

HAPROXY = "/usr/sbin/haproxy"
SOURCE = "127.0.0.2"  # the balancer's address as the nodes see it


@dataclass(frozen=True)
class Backend:
    """A node as the balancer sees it."""

    name: str
    dimse_port: int
    http_port: int


@dataclass
class HAProxy:
    process: subprocess.Popen
    dimse_port: int
    http_port: int
    folder: Path
    backends: list[Backend] = field(default_factory=list)

    @property
    def admin_socket(self) -> Path:
        return self.folder / "admin.sock"

    def command(self, line: str) -> str:
        """One command on the admin socket (e.g. "show servers state")."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.admin_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self, backend: str = "dimse_nodes") -> dict[str, str]:
        """Server name -> "UP", "DOWN", "DRAIN", "MAINT" (from `show stat`)."""
        out: dict[str, str] = {}
        for line in self.command("show stat").splitlines():
            cells = line.split(",")
            if len(cells) > 17 and cells[0] == backend and cells[1] not in ("BACKEND", "FRONTEND"):
                out[cells[1]] = cells[17]
        return out

    def wait_for(self, wanted: dict[str, str], timeout: float = 30) -> None:
        """Until every named server of both backends has the wanted state."""

        def reached() -> bool:
            return all(
                all(
                    self.states(b).get(name, "").startswith(state) for name, state in wanted.items()
                )
                for b in ("dimse_nodes", "web_nodes")
            )

        wait_until(reached, timeout, f"HAProxy servers {wanted} (now {self.states()})")

    def log(self) -> str:
        path = self.folder / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def config_text(
    backends: list[Backend],
    dimse_port: int,
    http_port: int,
    admin_socket: Path,
    proxy_protocol: bool = True,
    inter_ms: int = 500,
    fall: int = 2,
) -> str:
    """The balancer's configuration: `inter_ms` x `fall` (plus a check's own time, up to 2 s)
    is how long a node answering 503 on /healthz keeps getting new connections (the node's
    drain_seconds must exceed it)."""
    proxy = " send-proxy-v2" if proxy_protocol else ""
    check = f"check inter {inter_ms} fall {fall} rise 1"
    dimse_servers = [
        f"    server {b.name} 127.0.0.1:{b.dimse_port} {check} port {b.http_port}"
        f" source {SOURCE}{proxy}"
        for b in backends
    ]
    web_servers = [
        f"    server {b.name} 127.0.0.1:{b.http_port} {check} source {SOURCE}" for b in backends
    ]
    return "\n".join(
        [
            "global",
            f"    stats socket {admin_socket} mode 600 level admin",
            "    maxconn 2000",
            "defaults",
            "    timeout connect 5s",
            "    timeout client 120s",
            "    timeout server 120s",
            "    timeout check 2s",  # a loaded node's /healthz may take more than inter
            "    retries 3",
            "    option redispatch 1",
            "frontend dimse",
            "    mode tcp",
            f"    bind 127.0.0.1:{dimse_port}",
            "    default_backend dimse_nodes",
            "backend dimse_nodes",
            "    mode tcp",
            "    balance leastconn",
            "    option httpchk GET /healthz",
            "    http-check expect status 200",
            *dimse_servers,
            "frontend web",
            "    mode http",
            f"    bind 127.0.0.1:{http_port}",
            "    default_backend web_nodes",
            "backend web_nodes",
            "    mode http",
            "    balance roundrobin",
            "    option forwardfor",
            "    option httpchk GET /healthz",
            "    http-check expect status 200",
            *web_servers,
            "",
        ]
    )


def start_haproxy(folder: Path, backends: list[Backend], **options: object) -> HAProxy:
    """HAProxy on free loopback ports in front of `backends`; returns once every server is UP."""
    assert shutil.which(HAPROXY) or Path(HAPROXY).exists(), (
        "HAProxy is required for the scale-out tests (.ci/run installs the haproxy package)"
    )
    folder.mkdir(parents=True, exist_ok=True)
    dimse_port, http_port = free_port(), free_port()
    config = folder / "haproxy.cfg"
    config.write_text(
        config_text(backends, dimse_port, http_port, folder / "admin.sock", **options)
    )
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = (folder / "haproxy.log").open("ab")
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    balancer = HAProxy(process, dimse_port, http_port, folder, list(backends))

    def started() -> bool:
        assert process.poll() is None, f"haproxy exited:\n{balancer.log()}"
        return balancer.admin_socket.exists()

    try:
        wait_until(started, 30, "HAProxy to start")
        balancer.wait_for({b.name: "UP" for b in backends}, timeout=60)
    except BaseException:
        balancer.stop()
        raise
    return balancer
