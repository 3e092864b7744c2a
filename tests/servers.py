"""Real storage servers on 127.0.0.1 for the remote-storage tests and benchmark.

- SSHServer: Debian's OpenSSH server (/usr/sbin/sshd) on a free port, with a host key and a client key
  generated for the run and a known_hosts file, so the host key is really checked.
- S3Server: moto's S3-compatible server (`moto[server]` from PyPI), started as its own process. Chosen
  because it installs with pip on any machine, needs no Docker and no root, and speaks the S3 REST API
  that boto and s3fs (under dvc-s3) use; it keeps objects in memory, so a restart empties it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
S3_BUCKET = "qlora-artifacts"
# moto accepts any credentials; these are the test's own, kept in .dvc/config.local like real ones.
S3_KEY_ID, S3_SECRET = "test-key-id", "test-secret-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, and theirs, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SSHServer:
    """sshd on loopback; `home` is a HOME for clients, with the server's host key in .ssh/known_hosts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.user = getpass.getuser()
        self.storage = self.root / "storage"
        self.home = self.root / "client-home"
        self.client_key = self.root / "client_key"
        self.proc: subprocess.Popen | None = None

    def setup(self) -> SSHServer:
        self.storage.mkdir(parents=True)
        (self.home / ".ssh").mkdir(parents=True)
        host_key = self.root / "host_key"
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        public_host_key = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {public_host_key}\n")
        (self.root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPidFile {self.root / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
            "MaxSessions 64\nMaxStartups 64\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        return self

    def start(self) -> SSHServer:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for_port(self.port, self.proc, "sshd")
        return self

    def stop(self) -> None:
        """Stop the server and every connection it serves (each is an sshd process of its own)."""
        if self.proc and self.proc.poll() is None:
            for pid in [*_descendants(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{self.storage}"


class S3Server:
    """moto's S3 server on loopback, with one empty bucket."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for_port(self.port, self.proc, "moto S3 server")
        self.client().create_bucket(Bucket=S3_BUCKET)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY_ID,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"s3://{S3_BUCKET}/dvc"


def add_remote(project: Path, kind: str, server, name: str | None = None, default: bool = True) -> str:
    """`dvc remote add` the server; its URL goes to .dvc/config (in git), credentials to .dvc/config.local."""
    name = name or kind
    url = {"local": lambda: str(server), "ssh": lambda: server.url, "s3": lambda: server.url}[kind]()
    dvc = [shutil.which("dvc", path=os.path.dirname(sys.executable)) or "dvc"]
    run = lambda *args: subprocess.run([*dvc, *args], cwd=project, check=True, capture_output=True)  # noqa: E731
    run("remote", "add", *(["-d"] if default else []), "-f", name, url)
    if kind == "ssh":
        run("remote", "modify", "--local", name, "keyfile", str(server.client_key))
    elif kind == "s3":
        run("remote", "modify", name, "endpointurl", server.endpoint)
        run("remote", "modify", "--local", name, "access_key_id", S3_KEY_ID)
        run("remote", "modify", "--local", name, "secret_access_key", S3_SECRET)
    return name
