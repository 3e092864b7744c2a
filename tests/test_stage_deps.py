"""dvc.yaml's code deps match the code: each stage lists exactly the project modules its script imports.

DVC reruns a stage only when one of its declared deps changes, so a library module a stage imports but does not
declare leaves the stage stale after an edit while `dvc status` says all is up to date; a module declared but not
imported reruns the stage for nothing (and a blanket dependency on the whole package would rerun every stage on
any edit). The import closure is computed from the source with `ast`, every import statement counted, those
inside functions too (the library imports lazily, so most of its imports are there).
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import yaml

from helpers import ROOT, copy_project, sh

PACKAGE = "qlora_pipeline"
PACKAGE_DIR = Path("src") / PACKAGE
STAGES_DIR = Path("stages")
# Every module of the package is a file directly in it; a subpackage would need the scanner to learn dotted names.
INIT = PACKAGE_DIR / "__init__.py"


def _is_code(path: Path) -> bool:
    """Whether `path` (relative to the project root) is a project code file: a stage script or a library module."""
    return path.suffix == ".py" and path.parent in (PACKAGE_DIR, STAGES_DIR)


def imported_files(root: Path, path: Path) -> set[Path]:
    """The project code files (relative to `root`) that the file `path` (relative to `root`) imports directly,
    counting every import statement in it, inside functions too. Importing anything from the package also runs
    its __init__.py, which is counted."""
    tree = ast.parse((root / path).read_text(), filename=str(path))
    in_package = path.parent == PACKAGE_DIR
    found: set[Path] = set()

    def module(dotted: str, line: int) -> None:
        parts = dotted.split(".")
        if parts[0] == PACKAGE:
            found.add(INIT)
            if len(parts) > 1:
                file = PACKAGE_DIR / f"{parts[1]}.py"
                assert len(parts) == 2 and (root / file).is_file(), (
                    f"{path}:{line}: imports {dotted}, which is not a module file in {PACKAGE_DIR}")
                found.add(file)
        elif path.parent == STAGES_DIR and len(parts) == 1 and (root / STAGES_DIR / f"{dotted}.py").is_file():
            # A stage script runs with stages/ first on sys.path: a bare import of a sibling script loads it.
            found.add(STAGES_DIR / f"{dotted}.py")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative imports resolve against the file's package; only the package's own modules have one.
                assert in_package and node.level == 1, f"{path}:{node.lineno}: relative import outside the package"
                base = PACKAGE
            else:
                base = ""
            dotted = ".".join(part for part in (base, node.module) if part)
            module(dotted, node.lineno)
            if dotted == PACKAGE:
                # `from qlora_pipeline import x` imports the module x when there is one (else a name of __init__).
                for alias in node.names:
                    if (root / PACKAGE_DIR / f"{alias.name}.py").is_file():
                        found.add(PACKAGE_DIR / f"{alias.name}.py")
    return found


def import_closure(root: Path, script: Path) -> set[Path]:
    """`script` and every project code file it imports, transitively."""
    closure, pending = set(), [script]
    while pending:
        path = pending.pop()
        if path not in closure:
            closure.add(path)
            pending.extend(imported_files(root, path))
    return closure


def stage_scripts(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each stage of dvc.yaml: the script its cmd runs and its deps. A `foreach` stage is checked once, by its
    `do` template: every one of its stages runs the same script with the same deps."""
    stages = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        stage = stage.get("do", stage)
        scripts = [Path(word) for word in shlex.split(stage["cmd"]) if _is_code(Path(word))]
        assert len(scripts) == 1, f"stage {name}: cannot tell which script its cmd runs: {stage['cmd']!r}"
        stages[name] = scripts[0], [str(dep) for dep in stage.get("deps", [])]
    return stages


def code_dep_problems(root: Path) -> list[str]:
    """One line per mismatch between a stage's code deps in dvc.yaml and its script's import closure."""
    problems = []
    for name, (script, deps) in stage_scripts(root).items():
        declared = set()
        for dep in deps:
            path = Path(dep.rstrip("/"))
            if _is_code(path):
                declared.add(path)
            elif path in (Path("src"), PACKAGE_DIR, STAGES_DIR):
                problems.append(f"stage {name}: lists all of {dep} (every edit there would rerun it); "
                                "list the modules it imports instead")
        # __init__.py holds only the docstring and version (test_package_init_defines_nothing_a_stage_uses):
        # declaring it would rerun every stage on a version bump.
        closure = import_closure(root, script) - {INIT}
        problems += [f"stage {name}: imports {path} but dvc.yaml does not list it in deps"
                     for path in sorted(closure - declared)]
        problems += [f"stage {name}: dvc.yaml lists {path} in deps but {script} does not import it"
                     for path in sorted(declared - closure)]
    return problems


def test_stage_deps_are_the_import_closure():
    problems = code_dep_problems(ROOT)
    assert not problems, "dvc.yaml deps differ from the code:\n" + "\n".join(problems)


def test_package_init_defines_nothing_a_stage_uses():
    """__init__.py is left out of every stage's deps; that is right only while it defines nothing but the
    docstring and the version string (no imports, no code the stages run)."""
    tree = ast.parse((ROOT / INIT).read_text())
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        version = isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__version__"]
        assert docstring or version, (f"{INIT}:{node.lineno} defines code every stage runs: list {INIT} in every "
                                      "stage's deps in dvc.yaml and stop leaving it out in code_dep_problems")


def test_scanner_counts_every_kind_of_import(tmp_path):
    """The scanner finds the imports the project uses and those it may: in functions, relative, dotted, aliased,
    and `from qlora_pipeline import module`, and tells a module from a name."""
    package, stages = tmp_path / PACKAGE_DIR, tmp_path / STAGES_DIR
    package.mkdir(parents=True)
    stages.mkdir()
    for name in ("__init__", "a", "b", "c", "d", "e", "unused"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n    from .c import thing\n")
    (package / "c.py").write_text("import qlora_pipeline.d as dee\n")
    (stages / "helper.py").write_text("from qlora_pipeline import e, __version__\n")
    (stages / "run.py").write_text("import os\n\ndef main():\n    import helper\n    from qlora_pipeline.a import f\n")
    assert import_closure(tmp_path, STAGES_DIR / "run.py") == {
        STAGES_DIR / "run.py", STAGES_DIR / "helper.py", INIT,
        *(PACKAGE_DIR / f"{name}.py" for name in "abcde"),
    }


def test_problems_name_the_stage_and_the_module(tmp_path):
    """A missing module, a module listed but not imported and a blanket package dep are each reported."""
    copy = tmp_path / "project"
    (copy / STAGES_DIR).mkdir(parents=True)
    (copy / PACKAGE_DIR).mkdir(parents=True)
    (copy / INIT).write_text('"""docs"""\n')
    (copy / PACKAGE_DIR / "used.py").write_text("")
    (copy / PACKAGE_DIR / "stale.py").write_text("")
    (copy / STAGES_DIR / "go.py").write_text("def main():\n    from qlora_pipeline import used\n")
    (copy / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"go": {
        "cmd": "python stages/go.py --flag", "deps": ["src/qlora_pipeline/stale.py", "src/qlora_pipeline"]}}}))
    assert code_dep_problems(copy) == [
        "stage go: lists all of src/qlora_pipeline (every edit there would rerun it); list the modules it imports "
        "instead",
        "stage go: imports src/qlora_pipeline/used.py but dvc.yaml does not list it in deps",
        "stage go: imports stages/go.py but dvc.yaml does not list it in deps",
        "stage go: dvc.yaml lists src/qlora_pipeline/stale.py in deps but stages/go.py does not import it",
    ]


def test_editing_a_module_makes_every_stage_importing_it_stale(reproduced, tmp_path):
    """One line added to quantization.py in a reproduced project: `dvc status` lists exactly the stages whose
    scripts import it, directly or not, each for that file."""
    project = copy_project(reproduced[0], tmp_path / "project")
    edited = PACKAGE_DIR / "quantization.py"
    importers = {name for name, (script, _) in stage_scripts(project).items()
                 if edited in import_closure(project, script)}
    assert importers, f"no stage imports {edited}: pick a module some stage imports"
    with open(project / edited, "a") as file:
        file.write("# an edit\n")

    status = json.loads(sh(project, "dvc", "status", "--json"))
    # foreach stages are reported as NAME@KEY; they share their deps, so compare by the dvc.yaml name.
    stale = {name.split("@")[0] for name in status}
    assert stale == importers, (f"dvc status lists {sorted(stale)}; "
                                f"the stages importing {edited} are {sorted(importers)}")
    for name, changes in status.items():
        changed = {path for change in changes for path in change.get("changed deps", {})}
        assert changed == {str(edited)}, f"stage {name}: dvc status reports changed deps {changed}"
