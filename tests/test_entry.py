"""The stage scripts' shared start and end (stages/entry.py): the library of their own checkout, one command line."""

import json
import subprocess
import sys

from helpers import ROOT, copy_project, sh, tool_env


def test_experiment_runs_its_own_library_code(reproduced, tmp_path):
    """`dvc exp run --temp` (like a queued experiment) runs in a copy of the repository under .dvc/tmp/exps: a
    library edit made for the experiment is the code that runs there, not the editable install's src/, and
    the experiment's dvc.lock records the hash of the code that ran."""
    project = copy_project(reproduced[0], tmp_path / "project")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    library = project / "src/qlora_pipeline/tokenization.py"
    source = library.read_text()
    assert source.count('"rows": len(kept),') == 1
    library.write_text(source.replace('"rows": len(kept),', '"rows": len(kept), "edited_in_the_experiment": True,'))

    sh(project, "dvc", "exp", "run", "--temp", "-n", "edited-library", "tokenize")
    (ref,) = sh(project, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    assert ref.endswith("/edited-library")
    metrics = json.loads(sh(project, "git", "show", f"{ref}:metrics/tokenize.json"))
    assert metrics["train"].get("edited_in_the_experiment") is True, "the experiment ran the workspace's library"
    lock = sh(project, "git", "show", f"{ref}:dvc.lock")
    assert sh(project, "md5sum", str(library)).split()[0] in lock


def test_stage_command_line():
    """--help shows the stage's first docstring line; download takes its choice; no stage takes --params but
    train, which relaunches itself with it."""
    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=tool_env(), capture_output=True, text=True)

    shown = run("stages/format.py", "--help")
    assert shown.returncode == 0 and "Stage format: each row becomes a prompt" in shown.stdout
    assert "{model,data}" in run("stages/download.py", "--help").stdout
    refused = run("stages/subset.py", "--params", "other.yaml")
    assert refused.returncode == 2 and "unrecognized arguments: --params" in refused.stderr
    assert "--params" in run("stages/train.py", "--help").stdout
