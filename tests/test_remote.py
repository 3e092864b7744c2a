"""`dvc push` / `dvc pull` against real servers on 127.0.0.1: OpenSSH (dvc-ssh), moto's S3 server
(dvc-s3) and a local directory. A fresh clone of the git repo pulls every output byte for byte and has
nothing to reproduce; an interrupted push is retried to completion; a bad remote touches nothing."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import copy_project, make_project, sh, tiny_params, tool_env
from servers import S3_SECRET, SSHD, S3Server, SSHServer, add_remote

pytestmark = pytest.mark.slow

WORKSPACE = ("models", "data", "metrics", "reports", "checkpoints")


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory):
    if not Path(SSHD).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} is missing: .ci/run installs Debian's openssh-server")
        pytest.skip(f"{SSHD} is missing (apt-get install openssh-server)")
    server = SSHServer(tmp_path_factory.mktemp("sshd")).setup().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def servers(ssh_server, s3_server, tmp_path_factory):
    return {"local": tmp_path_factory.mktemp("local-remote"), "ssh": ssh_server, "s3": s3_server}


@pytest.fixture(scope="module")
def env(ssh_server):
    # HOME holds .ssh/known_hosts with the test server's host key: the host key is checked, not skipped.
    return tool_env(HOME=str(ssh_server.home))


def files(project):
    return {p.relative_to(project): p.read_bytes() for name in WORKSPACE for p in (project / name).rglob("*") if p.is_file()}


def git_repo(project, env):
    sh(project, "git", "init", "-q", env=env)
    sh(project, "dvc", "init", "-q", env=env)
    return project


def commit_all(project, env, message):
    sh(project, "git", "add", "-A", env=env)
    sh(project, "git", "commit", "-qm", message, env=env)


def clone(project, dest, kind, server, env):
    """What a colleague does on another machine: clone the git repo, give DVC the credentials locally."""
    sh(project.parent, "git", "clone", "-q", str(project), str(dest), env=env)
    add_remote(dest, kind, server)
    return dest


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory, env):
    """The tiny project reproduced and committed."""
    project = copy_project(reproduced[0], tmp_path_factory.mktemp("repo") / "project")
    commit_all(project, env, "tiny run")
    return project


@pytest.mark.parametrize("kind", ["local", "ssh", "s3"])
def test_fresh_clone_pulls_everything_and_reproduces_nothing(repo, servers, env, kind, tmp_path):
    add_remote(repo, kind, servers[kind])
    commit_all(repo, env, f"remote {kind}")
    # Credentials stay out of git: they are in .dvc/config.local, which DVC keeps ignored.
    tracked = sh(repo, "git", "show", "HEAD:.dvc/config", env=env)
    assert S3_SECRET not in tracked and "keyfile" not in tracked
    assert sh(repo, "git", "ls-files", ".dvc/config.local", env=env) == ""
    sh(repo, "dvc", "push", "-r", kind, env=env)

    other = clone(repo, tmp_path / "other-machine", kind, servers[kind], env)
    sh(other, "dvc", "pull", "-r", kind, env=env)
    assert json.loads(sh(other, "dvc", "status", "--json", env=env)) == {}
    assert "Running stage" not in sh(other, "dvc", "repro", env=env)
    assert files(other) == files(repo)


def test_unreachable_or_misconfigured_remote_touches_nothing(repo, ssh_server, s3_server, env, tmp_path):
    other = clone(repo, tmp_path / "other-machine", "s3", s3_server, env)
    sh(other, "dvc", "remote", "add", "nohost", f"ssh://{ssh_server.user}@127.0.0.1:1/nowhere", env=env)
    sh(other, "dvc", "remote", "add", "nobucket", "s3://no-such-bucket/dvc", env=env)
    sh(other, "dvc", "remote", "modify", "nobucket", "endpointurl", s3_server.endpoint, env=env)
    sh(other, "dvc", "remote", "modify", "--local", "nobucket", "access_key_id", "x", env=env)
    sh(other, "dvc", "remote", "modify", "--local", "nobucket", "secret_access_key", "y", env=env)
    sh(repo, "dvc", "remote", "add", "-f", "nohost", f"ssh://{ssh_server.user}@127.0.0.1:1/nowhere", env=env)
    repo_before, repo_cache = files(repo), sorted((repo / ".dvc/cache").rglob("*"))
    for project, command, remote, expected in (
        (other, "pull", "nohost", "ERROR"),
        (other, "pull", "nobucket", "ERROR"),
        (repo, "push", "nohost", "ERROR"),
    ):
        before = files(project)
        result = subprocess.run(["dvc", command, "-r", remote], cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.startswith(expected)]
        assert lines, result.stderr[-2000:]
        assert files(project) == before
    assert files(repo) == repo_before and sorted((repo / ".dvc/cache").rglob("*")) == repo_cache
    print("\n".join(lines))


# ----------------------------------------------------------------------------------- model-sized artifact


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory, env):
    """A repo whose download@model output is the distilgpt2-shaped base: 328 MB of float32 safetensors."""
    params = tiny_params(model={"source": "random", "name": "distilgpt2"})
    project = git_repo(make_project(tmp_path_factory.mktemp("big") / "project", params), env)
    sh(project, "dvc", "repro", "download@model", env=env)
    commit_all(project, env, "distilgpt2 base")
    assert (project / "models/base/model.safetensors").stat().st_size > 300e6
    return project


def model_files(project):
    return {p.name: p.read_bytes() for p in (project / "models/base").iterdir()}


def cloud_status(project, remote, env):
    return json.loads(sh(project, "dvc", "status", "-c", "-r", remote, "--json", env=env))


def wait_until(condition, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the push ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pull_into_clone_and_compare(project, kind, server, env, dest):
    other = clone(project, dest, kind, server, env)
    sh(other, "dvc", "pull", "-r", kind, "download@model", env=env)
    assert model_files(other) == model_files(project)


def test_push_interrupted_by_a_stopped_ssh_server_is_retried(big_repo, ssh_server, env, tmp_path):
    add_remote(big_repo, "ssh", ssh_server, name="big-ssh")
    storage = ssh_server.storage
    push = subprocess.Popen(["dvc", "push", "-r", "big-ssh"], cwd=big_repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Stop the server once 50 MB of the model file have arrived.
    wait_until(lambda: sum(p.stat().st_size for p in storage.rglob("*") if p.is_file()) > 50e6, push, "50 MB arrived")
    ssh_server.stop()
    assert push.wait(120) != 0
    ssh_server.start()
    assert cloud_status(big_repo, "big-ssh", env), "the push was not interrupted"

    sh(big_repo, "dvc", "push", "-r", "big-ssh", env=env)
    assert cloud_status(big_repo, "big-ssh", env) == {}
    pull_into_clone_and_compare(big_repo, "ssh", ssh_server, env, tmp_path / "other-machine")


def test_push_killed_midway_to_s3_is_retried(big_repo, s3_server, env, tmp_path):
    add_remote(big_repo, "s3", s3_server, name="big-s3")
    client = s3_server.client()

    def uploading():
        uploads = client.list_multipart_uploads(Bucket="qlora-artifacts").get("Uploads", [])
        return any(client.list_parts(Bucket="qlora-artifacts", Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
                   for u in uploads)

    push = subprocess.Popen(["dvc", "push", "-r", "big-s3"], cwd=big_repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(uploading, push, "the model's multipart upload has parts")
    os.killpg(push.pid, signal.SIGKILL)
    push.wait()
    assert cloud_status(big_repo, "big-s3", env), "the push was not interrupted"

    sh(big_repo, "dvc", "push", "-r", "big-s3", env=env)
    assert cloud_status(big_repo, "big-s3", env) == {}
    pull_into_clone_and_compare(big_repo, "s3", s3_server, env, tmp_path / "other-machine")
    shutil.rmtree(tmp_path / "other-machine")
