"""The layout's promises, checked on the code itself: every DVC stage depends on its script
and on each project module it imports (so no code change can leave a stale output), stages
import only the library, the library never reads params.yaml, nothing edits sys.path."""
import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PIPELINES = [ROOT / "dvc.yaml", ROOT / "cv" / "dvc.yaml", ROOT / "loco" / "dvc.yaml", ROOT / "fast" / "dvc.yaml"]
PROJECT_PACKAGES = {"ser", "stages", "bench", "tests"}


def _stages():
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load(pipeline.read_text())["stages"].items():
            yield f"{pipeline.relative_to(ROOT)}:{name}", stage


def _imports(path: Path) -> set[str]:
    """Top-level project packages (and their modules) that a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n for n in names if n.split(".")[0] in PROJECT_PACKAGES}
    return found


def stage_library(script: Path) -> list[str]:
    """The ser/ files a stage script runs: the modules it imports, and theirs, transitively
    (imports inside functions too), and the package's __init__."""
    graph, todo, seen = library_imports(), [m for m in _imports(script) if m.startswith("ser.")], set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    return sorted({module_file(p) for m in seen for p in packages_of(m)} | {module_file(m) for m in seen})


def module_file(module: str) -> str:
    """ser.x -> ser/x.py; a package (ser, ser.labeller) -> its __init__.py."""
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def packages_of(module: str) -> list[str]:
    """The packages Python imports before `module`: ser.labeller.cli -> ser, ser.labeller."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def library_files() -> list[Path]:
    return sorted((ROOT / "ser").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("name, stage", list(_stages()), ids=[n for n, _ in _stages()])
def test_a_stage_depends_on_its_script_and_exactly_the_library_modules_it_runs(name, stage):
    """So that no code change leaves a stale output, and no change elsewhere reruns the stage."""
    script = re.search(r"python (stages/\w+\.py)", stage["cmd"]).group(1)
    deps = set(stage["deps"])
    assert script in deps, f"{name}: {script} is not among its deps"
    for module in _imports(ROOT / script):
        assert module.split(".")[0] == "ser", f"{name}: {script} imports {module}; a stage imports only the library"
    library = {d for d in deps if d == "ser" or d.startswith("ser/")}
    wanted = set(stage_library(ROOT / script))
    assert library == wanted, f"{name}: deps lack {sorted(wanted - library)}, have extra {sorted(library - wanted)}"


def test_the_library_imports_only_itself_and_never_reads_params():
    for path in library_files():
        assert {m.split(".")[0] for m in _imports(path)} <= {"ser"}, path
        assert "import yaml" not in path.read_text(), f"{path} imports a YAML parser: the library reads no params"


def test_no_stage_imports_another_and_each_is_short_with_a_main():
    for path in sorted((ROOT / "stages").glob("*.py")):
        tree = ast.parse(path.read_text())
        assert not any(m.startswith("stages") for m in _imports(path)), path
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{path}: no main()"
        assert len(path.read_text().splitlines()) < 60, f"{path}: a stage script is under 60 lines"


def test_no_sys_path_edits_and_no_long_functions():
    for path in sorted(p for d in ("ser", "stages", "bench", "tests") for p in (ROOT / d).rglob("*.py")):
        text = path.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text or path.name == "test_stages.py", path
        if path.relative_to(ROOT).parts[0] in ("ser", "stages"):
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    assert node.end_lineno - node.lineno + 1 <= 60, f"{path}:{node.lineno} {node.name}()"


def test_no_library_file_is_long_and_the_labeller_is_in_rooms():
    """One job a file: none of ser/ over 400 lines, none of the labeller's over 300."""
    for path in library_files():
        limit = 300 if path.parent.name == "labeller" else 400
        assert len(path.read_text().splitlines()) <= limit, path


def test_params_are_short_and_every_setting_says_what_it_is():
    lines = (ROOT / "params.yaml").read_text().splitlines()
    assert len(lines) <= 81
    for line in lines:
        value = re.match(r"^\s+\w+:\s*(\S.*)$", line)
        if value:  # a setting with a value (sections and their heads need none)
            assert "#" in line or lines[lines.index(line) - 1].strip().startswith("#"), line
    assert not any(re.search(r"data/|reports/|metrics/", line) for line in lines), "paths belong in dvc.yaml"


def test_readme_is_for_users():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("override, key, value", [
    ("train.lr=0.001", ("train", "lr"), 0.001),  # README's examples
    ("cv.folds=speakers", ("cv", "folds"), "speakers"),
    ("train.augment.freq_mask=0", ("train", "augment", "freq_mask"), 0),  # inside a flow mapping
    ("features.encoder=null", ("features", "encoder"), None),  # the model before the encoder
    ("download.archives.tess.url=../shared/data/tess/tess.zip", ("download", "archives", "tess", "url"),
     "../shared/data/tess/tess.zip"),  # the Makefile's local archives
    ("+metadata.corpora.crema_d={kind: crema_d, test_speakers: [1001, 1002]}", ("metadata", "corpora", "crema_d"),
     {"kind": "crema_d", "test_speakers": [1001, 1002]}),
])
def test_params_survive_dvc_rewriting_them(tmp_path, override, key, value):
    """`dvc exp run -S` rewrites params.yaml with its own YAML dumper (unquoted strings, wrapped
    lines): every stage must still read what was there, plus the one change."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    expected = yaml.safe_load(params.read_text())
    section = expected
    for name in key[:-1]:
        section = section[name]
    section[key[-1]] = value
    apply_overrides(params, [override])
    assert yaml.safe_load(params.read_text()) == expected


def library_imports() -> dict[str, set[str]]:
    """Each module of ser/ and the ser modules it imports anywhere in it, inside functions too."""
    graph = {}
    for path in library_files():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ser":
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}  # a name may be a module
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ser.")}
        found = {m for m in found if (ROOT / module_file(m)).is_file()}
        graph[module_name(path)] = found - {module_name(path)}
    return graph


def test_the_library_has_no_import_circle_even_through_imports_inside_functions():
    graph = library_imports()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(trail[trail.index(dep):] + [dep])
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_page_or_the_labeller_reruns_no_training_and_the_decoding_code_reruns_every_model_stage():
    runs = {name: set(stage["deps"]) for name, stage in _stages()}
    interfaces = {"ser/app.py", "ser/cli.py", *(str(p.relative_to(ROOT)) for p in (ROOT / "ser/labeller").glob("*.py"))}
    for name in ("dvc.yaml:train", "dvc.yaml:evaluate", "cv/dvc.yaml:cv", "loco/dvc.yaml:loco", "fast/dvc.yaml:train",
                 "fast/dvc.yaml:evaluate", "fast/dvc.yaml:loco"):
        assert not runs[name] & interfaces, (name, runs[name] & interfaces)
    assert all("ser/audio.py" in deps for name, deps in runs.items() if not name.endswith(":download"))


def test_the_unseen_temperature_the_model_carries_is_the_one_leave_one_corpus_out_fitted():
    """params.yaml's confidence.unseen_temperature is a measurement, not a choice: make loco's."""
    import json

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    fitted = json.loads((ROOT / "metrics/loco.json").read_text())["unseen_temperature"]
    assert params["confidence"]["unseen_temperature"] == fitted
    # the fast model's own, from make fast's leave-one-corpus-out
    fitted = json.loads((ROOT / "metrics/fast/loco.json").read_text())["unseen_temperature"]
    assert params["fast"]["unseen_temperature"] == fitted
