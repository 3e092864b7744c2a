"""Remote storage throughput: `dvc push` and `dvc pull` of a model-sized artifact through each remote kind.

The artifact is the pipeline's own download@model output for the distilgpt2-shaped random model
(328 MB of float32 safetensors plus tokenizer files), pushed from a git + DVC repo and pulled into a
fresh clone, through real servers on 127.0.0.1 (tests/servers.py): OpenSSH via dvc-ssh, moto's S3
server via dvc-s3, and a local directory. Loopback: this measures DVC, the protocol and the server on
this machine's CPUs, not a network.

    python bench/remote_throughput.py [--repeats 2]

Prints a table and writes bench/results/remote_throughput-<UTC time>-<host>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(args: argparse.Namespace) -> None:
    from conftest import make_project, sh, tiny_params, tool_env
    from servers import S3Server, SSHServer, add_remote

    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    ssh, s3 = SSHServer(work / "sshd").setup().start(), S3Server().start()
    env = tool_env(HOME=str(ssh.home))
    try:
        repo = make_project(work / "repo", tiny_params(model={"source": "random", "name": "distilgpt2"}))
        for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "repro", "download@model")):
            sh(repo, *cmd, env=env)
        size = sum(p.stat().st_size for p in (repo / "models/base").iterdir())
        servers = {"local": work / "local-remote", "ssh": ssh, "s3": s3}
        rows = []
        for kind, server in servers.items():
            add_remote(repo, kind, server, default=False)
            sh(repo, "git", "add", "-A", env=env)
            sh(repo, "git", "commit", "-qm", f"remote {kind}", env=env)
            for repeat in range(args.repeats):
                if repeat:  # push again from scratch: empty the remote
                    {"local": lambda: shutil.rmtree(server), "ssh": lambda: shutil.rmtree(ssh.storage / "files"),
                     "s3": lambda: _empty_bucket(s3)}[kind]()
                start = time.perf_counter()
                sh(repo, "dvc", "push", "-r", kind, env=env)
                push_s = time.perf_counter() - start
                clone = work / f"clone-{kind}-{repeat}"
                sh(work, "git", "clone", "-q", str(repo), str(clone), env=env)
                add_remote(clone, kind, server, default=False)
                start = time.perf_counter()
                sh(clone, "dvc", "pull", "-r", kind, "download@model", env=env)
                pull_s = time.perf_counter() - start
                same = all((clone / "models/base" / p.name).read_bytes() == p.read_bytes()
                           for p in (repo / "models/base").iterdir())
                shutil.rmtree(clone)
                rows.append({"remote": kind, "repeat": repeat + 1, "bytes": size, "push_s": round(push_s, 2),
                             "pull_s": round(pull_s, 2), "push_MB_s": round(size / 1e6 / push_s, 1),
                             "pull_MB_s": round(size / 1e6 / pull_s, 1), "pulled_identical": same})
                print(rows[-1], flush=True)
    finally:
        ssh.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'remote':8} {'MB':>6} {'push s':>7} {'push MB/s':>10} {'pull s':>7} {'pull MB/s':>10}  identical")
    for r in rows:
        print(f"{r['remote']:8} {r['bytes'] / 1e6:6.0f} {r['push_s']:7.2f} {r['push_MB_s']:10.1f} "
              f"{r['pull_s']:7.2f} {r['pull_MB_s']:10.1f}  {r['pulled_identical']}")
    host = platform.node() or "host"
    record = {
        "benchmark": "remote_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"host": host, "cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "versions": _versions(), "artifact": "download@model output, random distilgpt2 (float32 safetensors)",
        "results": rows,
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = ROOT / "bench/results" / f"remote_throughput-{stamp}-{host}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def _empty_bucket(s3) -> None:
    from servers import S3_BUCKET

    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=S3_BUCKET, Key=obj["Key"])


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("dvc", "dvc-ssh", "dvc-s3", "moto", "asyncssh", "s3fs")} | {
        "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="push/pull rounds per remote (the remote is emptied between)")
    main(parser.parse_args())
