"""Outputs as a stage leaves them: the usual file modes, and nothing of a killed run left behind.

Outputs that are symbolic links are refused: cases in test_bad_input.py."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from helpers import ROOT, copy_project, run_stage, sh

OUTPUTS = ("models", "data", "metrics", "reports", "dvclive")


def test_every_output_file_has_the_umask_mode(ran):
    """Libraries that write through a private temporary file (safetensors' weights: 0600) do not decide who can
    read an output: every file and folder of every output has the mode the umask gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    wrong = {}
    for top in OUTPUTS:
        for path in [ran / top, *(ran / top).rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            expected = (0o777 if path.is_dir() else 0o666) & ~umask
            if mode != expected:
                wrong[str(path.relative_to(ran))] = oct(mode)
    assert not wrong, f"modes other than the umask's ({oct(umask)}): {wrong}"


def dead_pid() -> int:
    """The process id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_run_are_removed_and_ignored(ran, tmp_path):
    """A stage killed between writing its temporary copy and renaming it leaves `.NAME.tmp-PID-*` (and, killed
    in the middle of the swap, `.NAME.old-PID`) beside the output. The next run of the stage removes those of
    processes that are gone and keeps those of a live one; git ignores them meanwhile, so `git add -A` never
    commits model weights."""
    project = copy_project(ran, tmp_path / "project")
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    dead, alive = dead_pid(), os.getpid()
    leftovers = {
        "dead": [f"data/.formatted.tmp-{dead}-x1y2", f"data/.formatted.old-{dead}", f"data/.subset.tmp-{dead}-a"],
        "alive": [f"data/.formatted.tmp-{alive}-z3w4"],
    }
    for name in leftovers["dead"] + leftovers["alive"]:
        (project / name).mkdir()
        (project / name / "model.safetensors").write_bytes(b"weights")
    (project / f"metrics/.tokenize.json.tmp-{dead}-q").write_text("{")

    untracked = sh(project, "git", "status", "--porcelain", "--untracked-files=all")
    assert not any(".tmp-" in line or ".old-" in line for line in untracked.splitlines()), untracked

    run_stage(project, "format.py")
    assert not (project / leftovers["dead"][0]).exists() and not (project / leftovers["dead"][1]).exists()
    assert (project / leftovers["alive"][0] / "model.safetensors").is_file()
    # Only the stage's own outputs are cleaned: another stage's leftovers wait for that stage.
    assert (project / leftovers["dead"][2]).is_dir() and (project / f"metrics/.tokenize.json.tmp-{dead}-q").is_file()


def test_files_written_together_replace_the_old_ones_together(tmp_path):
    """A stage's reports and metrics go through one outputs.write_texts: when writing one of them fails (here a
    text that cannot be encoded; a full disk does the same), every old file stays and no temporary is left."""
    from qlora_pipeline import outputs

    old = {tmp_path / "report.md": "old report\n", tmp_path / "metrics.json": "{}\n"}
    for path, text in old.items():
        path.write_text(text)
    with pytest.raises(UnicodeEncodeError):
        outputs.write_texts({tmp_path / "report.md": "new report\n", tmp_path / "metrics.json": "\ud800"})
    assert {path: path.read_text() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md"]

    outputs.write_texts({tmp_path / "report.md": "new report\n", tmp_path / "metrics.json": "{\"a\": 1}\n"})
    assert (tmp_path / "report.md").read_text() == "new report\n"
