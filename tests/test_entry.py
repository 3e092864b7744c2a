"""The stage scripts' shared start and end (stages/entry.py): the library of their own checkout, one command line."""

import gc
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
    """A stage that imports bitsandbytes (peft does) does not import torch's compiler with it, also after a library
    looked it up to see whether it is installed; torch.compile is torch's own again afterwards. Without entry.py's
    import hook the compiler is imported (bitsandbytes decorates its CPU kernels with torch.compile)."""
    probe = ("import importlib.util, sys; sys.path.insert(0, 'stages'); import entry, torch; compile_now = torch.compile; "
             "importlib.util.find_spec('bitsandbytes'); import peft, bitsandbytes; "
             "print('torch._inductor.compile_fx' in sys.modules, torch.compile is compile_now, "
             "type(bitsandbytes.__spec__.loader).__name__, len(sys.meta_path))")
    plain = probe.replace("import entry, torch", "import torch")
    shown, without = (subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=tool_env(), capture_output=True, text=True)
                      for code in (probe, plain))
    assert shown.stdout.split()[:3] == ["False", "True", "_LoaderCompilingOnFirstCall"], shown.stderr
    assert shown.stdout.split()[3] == without.stdout.split()[3], "the finder is left in sys.meta_path"
    assert without.stdout.split()[0] == "True"


def test_compile_on_first_call():
    """What bitsandbytes gets for torch.compile while it is imported: the same compilation, made on the first call,
    in both of torch.compile's forms (plain and with options); where torch.compile itself fails, the function as
    it is, without trying again (as bitsandbytes falls back when its decorator's torch.compile raises)."""
    saved_threshold, saved_finders = gc.get_threshold(), list(sys.meta_path)
    try:   # executing entry.py changes the process: undone below
        spec = importlib.util.spec_from_file_location("entry", ROOT / "stages" / "entry.py")
        entry = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(entry)
    finally:
        gc.set_threshold(*saved_threshold)
        sys.meta_path[:] = saved_finders
    compiled = []

    def compile_now(function, **options):
        compiled.append((function.__name__, options))
        if options.get("fails"):
            raise RuntimeError("torch.compile is not supported here")
        return lambda *args: ("compiled", function(*args))

    lazy = entry._compile_on_first_call(compile_now)

    def double(x):
        return 2 * x

    plain, with_options, failing = lazy(double), lazy(dynamic=False)(double), lazy(double, fails=True)
    assert compiled == [] and plain.__name__ == "double"
    assert plain(3) == ("compiled", 6) and plain(4) == ("compiled", 8)
    assert with_options(5) == ("compiled", 10)
    assert failing(6) == 12 and failing(7) == 14
    assert compiled == [("double", {}), ("double", {"dynamic": False}), ("double", {"fails": True})]
