"""The stage scripts' shared start and end (stages/entry.py): the library of their own checkout, one command line."""

import importlib.util
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


def test_bitsandbytes_is_imported_without_torchs_compiler():
    """A stage that imports bitsandbytes (peft does) does not import torch's compiler with it, and torch.compile
    is torch's own again afterwards. Without entry.py's import hook the compiler is imported (bitsandbytes
    decorates its CPU kernels with torch.compile)."""
    probe = ("import sys; sys.path.insert(0, 'stages'); import entry, torch; compile_now = torch.compile; "
             "import peft, bitsandbytes; "
             "print('torch._inductor.compile_fx' in sys.modules, torch.compile is compile_now)")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert shown.stdout.split() == ["False", "True"], shown.stderr


def test_compile_on_first_call():
    """What bitsandbytes gets for torch.compile while it is imported: the same compilation, made on the first call,
    in both of torch.compile's forms (plain and with options)."""
    spec = importlib.util.spec_from_file_location("entry", ROOT / "stages" / "entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    compiled = []

    def compile_now(function, **options):
        compiled.append((function.__name__, options))
        return lambda *args: ("compiled", function(*args))

    lazy = entry._compile_on_first_call(compile_now)

    def double(x):
        return 2 * x

    plain, with_options = lazy(double), lazy(dynamic=False)(double)
    assert compiled == [] and plain.__name__ == "double"
    assert plain(3) == ("compiled", 6) and plain(4) == ("compiled", 8)
    assert with_options(5) == ("compiled", 10)
    assert compiled == [("double", {}), ("double", {"dynamic": False})]
