"""The repository's own rules, checked: its documents are its own, every citation of them resolves and every section
mark names its file; the README's layout names every module; the core never imports the app layer; no import cycles;
no function over 80 lines; importing glif2 changes no torch setting; no script imports another script or shadows a
module.
"""

import ast
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".toml", ".sh") or p.name == "Makefile"]
SOURCES = [
    p
    for p in SOURCES
    if not any(part.startswith(".") or part in ("build", "runs") for part in p.relative_to(ROOT).parts)
]
# `docs/neuron.md §9 Q3`, `docs/networks.md §1-§3 and §5`; inside docs/ also a sibling's `neuron.md §N`.
CITATION = re.compile(r"(?<![\w/])(docs/)?([a-z]+)\.md((?:(?: and)? §[0-9.]+(?:-§[0-9.]+)?,?)*)(?: (Q[0-9]+))?")
# A style-guide rule number (S and digits): the guide lives outside the repository, so such a mark tells a reader
# nothing; the comment should say the reason itself.
RULE = re.compile(r"\bS[0-9]+\b")


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def headings(doc: Path) -> set[str]:
    """Section numbers of a docs file: `## 3. Title` -> "3", `### 3.2 Title` -> "3.2"."""
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,4} ([0-9][0-9.]*)", doc.read_text(), re.M)}


def in_docs(path: Path) -> bool:
    return path.parent == ROOT / "docs"


def is_citation(m: re.Match, docs: bool) -> bool:
    """A CITATION match names its document: by its docs/ path, or (inside docs/) by a sibling's name."""
    return bool(m.group(1)) or docs


def unfiled_marks(text: str, docs: bool = False) -> list[str]:
    """The marks in `text` that name no file: a style-rule number anywhere, and outside docs/ a section mark that is
    not part of a citation of a docs/ file (CITATION). Inside docs/ a bare `§N` is the document's own section
    (resolved by test_every_docs_citation_resolves)."""
    rest = CITATION.sub(lambda m: " " * len(m.group(0)) if is_citation(m, docs) else m.group(0), text)
    marks = [m.group(0) for m in RULE.finditer(rest)]
    if not docs:
        marks += [m.group(0).strip() for m in re.finditer(r"\S*\s?\S*\s?§[0-9][0-9.]*", rest)]
    return marks


def test_every_docs_citation_resolves():
    """`docs/neuron.md §9 Q3` in code, tests, help text and docs (and in docs, `neuron.md §N` or this document's
    own `§N`): the file, the section and the quirk all exist."""
    cited = 0
    for path in SOURCES:
        text = path.read_text(errors="ignore")
        for m in CITATION.finditer(text):
            if not is_citation(m, in_docs(path)):
                continue
            doc = ROOT / "docs" / f"{m.group(2)}.md"
            where = f"{path.relative_to(ROOT)}: {m.group(0)!r}"
            assert doc.is_file(), where
            for s in re.findall(r"§([0-9.]+)", m.group(3)):
                assert s.rstrip(".") in headings(doc), f"{where}: no section {s} in {doc.name}"
            if m.group(4):
                assert re.search(rf"^\| {m.group(4)} \|", doc.read_text(), re.M), f"{where}: no {m.group(4)}"
            cited += 1
        if in_docs(path):
            rest = CITATION.sub(" ", text)
            for s in re.findall(r"§([0-9][0-9.]*)", rest):
                assert s.rstrip(".") in headings(path), f"{path.relative_to(ROOT)}: no section {s} of its own"
    assert cited > 30  # the code does cite its documents


def test_every_mark_names_its_file():
    """A section mark names its document (`docs/training.md §2`, not `§N` alone), and no comment cites a rule of a
    guide outside the repository: a reader must be able to follow every mark."""
    unfiled = {str(p.relative_to(ROOT)): unfiled_marks(p.read_text(errors="ignore"), in_docs(p)) for p in SOURCES}
    assert not {k: v for k, v in unfiled.items() if v}


def test_unfiled_marks_are_caught():
    """The check above catches the marks it was written for: the repository holds none, so they are planted here
    (split in the source, so that this file passes the check itself)."""
    sign, rule = "\N{SECTION SIGN}", "S"
    assert unfiled_marks(f"Build order ({rule}13): checks (before any work), data, model") == [f"{rule}13"]
    assert unfiled_marks(f"Honest timing ({rule}12): warm-up steps first") == [f"{rule}12"]
    assert unfiled_marks(f"stages [2, 2, 2, 2] all stride 2, {sign}4.1. The released") == [f"stride 2, {sign}4.1."]
    assert unfiled_marks(f"see neuron.md {sign}6 for tdBN")  # a document outside docs/ names it by its path
    assert unfiled_marks(f"{sign}7 templates.") == [f"{sign}7"]
    assert not unfiled_marks(f"as docs/networks.md {sign}1-{sign}3 and {sign}5, docs/neuron.md {sign}9 Q3")
    assert not unfiled_marks(f"the split ({sign}6) and neuron.md {sign}2.3", docs=True)
    assert unfiled_marks(f"({rule}13)", docs=True) == [f"{rule}13"]


def test_no_foreign_documents_or_machine_paths():
    """Nothing points to documents that are not in the repository, or to a path of the machine it was written on."""
    foreign = re.compile(r"\b(GLIF|ARCHITECTURES|TRAINING|DVS-FRAMES|PEERS|PERF-NOTES)\.md\b")
    for path in SOURCES:
        text = path.read_text(errors="ignore")
        assert not foreign.search(text), f"{path.relative_to(ROOT)} cites a document outside the repository"
        # a clone under the system's temp folder (CI) makes that folder the parent; scripts may name it on purpose
        for local in {str(ROOT.parent), str(Path.home())} - {tempfile.gettempdir(), "/"}:
            assert local + "/" not in text, f"{path.relative_to(ROOT)} names a path of this machine ({local})"


def layout_names(readme: str) -> set[str]:
    """The paths the README's Layout block names. An entry starts at column 0 (indented lines continue it); its head
    (up to two spaces) is a file, a comma-separated list of files, or a folder whose files (`x.py`, `x.sh`) the entry
    names."""
    block = re.search(r"^## Layout\n+```\n(.*?)^```", readme, re.M | re.S)
    assert block, "README.md has no Layout block"
    names = set()
    for entry in re.split(r"\n(?=\S)", block.group(1).strip()):
        head = re.split(r"\s{2,}", entry, maxsplit=1)[0]
        if head.endswith("/"):
            names |= {head} | {head + f for f in re.findall(r"\b[\w.]+\.(?:py|sh)\b", entry)}
        else:
            names |= {name.strip() for name in head.split(",")}
    return names


def test_readme_layout_names_every_module():
    """Every module of glif2/ and pipelines/, every benchmark and script is named in the README's Layout, and
    everything it names exists: the layout cannot silently go stale."""
    named = layout_names((ROOT / "README.md").read_text())
    modules = [
        *python_files("glif2", "pipelines", "bench"),
        *(p for p in (ROOT / "scripts").iterdir() if p.is_file()),
        *ROOT.glob("*.py"),
    ]
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in named)
    assert not missing, f"README.md's Layout does not name {missing}"
    assert not [name for name in named if not (ROOT / name).exists()], "README.md's Layout names missing paths"
    # the parser reads the entries as written: a folder's files, a list of files, a file
    sample = "## Layout\n\n```\na/b.py        x\nc/           d.py (e), f.sh\n             g.py\nh.py, i.py   j\n```\n"
    assert layout_names(sample) == {"a/b.py", "c/", "c/d.py", "c/f.sh", "c/g.py", "h.py", "i.py"}


def _imports(path: Path) -> set[str]:
    """The first-party modules a file imports, anywhere in it (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("glif2", "pipelines")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_and_the_core_never_imports_the_app():
    files = python_files("glif2", "pipelines")
    modules = {_module_name(p): p for p in files}
    graph = {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}
    for name, deps in graph.items():
        if not name.startswith("glif2.train") and name.startswith("glif2"):
            assert not any(d.startswith(("glif2.train", "pipelines")) for d in deps), f"{name} imports the app layer"
    # Package __init__ edges count: a package re-exports its submodules, so a submodule that imports the package by
    # name (`from glif2 import memory`, `import glif2`) closes a cycle through the __init__. Submodules import
    # submodules (`from glif2.memory.grid import Grid`), never their package.
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each first-party module imported first, in a process of its own (tests/probe.py: forked from one that has
    only torch and the third-party libraries loaded): an import-order dependence or a cycle through a package
    __init__ fails it."""
    names = sorted(_module_name(p) for p in python_files("glif2", "pipelines"))
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "probe.py"), *names],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout[-3000:] + out.stderr[-2000:]


def test_modules_in_glif2_stay_small():
    long = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in python_files("glif2")
        if (n := len(p.read_text().splitlines())) > 400
    ]
    assert not long, long


def test_no_function_over_80_lines():
    long = []
    for path in [*python_files("glif2", "pipelines"), ROOT / "train.py", ROOT / "eval.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_scripts_import_the_package_never_another_script():
    # A script named like a module shadows it for every script beside it (`python bench/x.py` puts bench/ first on
    # sys.path): bench/pipelines.py once made `import pipelines` load itself. So no file there is named like our
    # packages, a standard-library module or an installed one (bench/peers.py is imported as a sibling).
    for folder in ("bench", "tests", "scripts"):
        for p in (ROOT / folder).glob("*.py"):
            assert p.stem not in ("glif2", "pipelines") and p.stem not in sys.stdlib_module_names, p
            spec = importlib.util.find_spec(p.stem)
            shadowed = spec is not None and not (spec.origin and ROOT in Path(spec.origin).parents)
            assert not shadowed, f"{p.relative_to(ROOT)} shadows {spec.name} ({spec.origin})"
    for path in [*python_files("tests", "bench", "glif2", "pipelines"), ROOT / "train.py", ROOT / "eval.py"]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"train", "eval"}, f"{path.relative_to(ROOT)} imports a script"


_IMPORT_PROBE = """
import einops, torch
import torch._dynamo.config as config
from torch._dynamo import trace_rules
def state():
    return dict(config.get_config_copy()), [trace_rules.lookup_callable(f) for f in (einops.rearrange, einops.repeat)]
before = state()
import glif2, glif2.models
after = state()
changed = [k for k in before[0] if before[0][k] != after[0][k]]
print("CHANGED", changed, before[1] == after[1])
"""


def test_import_changes_no_torch_setting():
    """`import glif2` leaves dynamo's configuration and its allow-in-graph registry as it found them."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "CHANGED [] True" in out.stdout, out.stdout + out.stderr


_HELP_PROBE = """
import contextlib, io, runpy, sys
failed = []
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    sys.path.insert(0, script.rsplit("/", 1)[0])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failed.append(f"{script}: exit {exit.code}")
    except Exception as err:
        failed.append(f"{script}: {type(err).__name__}: {err}")
    else:
        failed.append(f"{script}: --help did not exit")
    if not out.getvalue().startswith("usage:"):
        failed.append(f"{script}: no usage line")
print("FAILED", failed)
"""


def test_every_benchmark_and_script_answers_help():
    """Each bench/ script and train.py / eval.py parses `--help` after importing all it imports: a name that moved in
    the package (a benchmark importing it from its old place) fails here, not in a user's hands."""
    scripts = [str(p) for p in [*python_files("bench"), ROOT / "train.py", ROOT / "eval.py"] if p.name != "peers.py"]
    out = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, *scripts], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert "FAILED []" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.parametrize("tool", ["glif2-train", "glif2-eval"])
def test_console_entry_points_answer(tool):
    exe = Path(sys.executable).parent / tool
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"usage: {tool}")
    if tool == "glif2-train":  # every choice flag lists its values
        assert "--dataset {cifar10,cifar100,imagenet,cifar10dvs,digits}" in out
        assert "--gate-mode {soft,hard,static_soft,static_hard}" in out
