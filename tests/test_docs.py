"""The user docs say only what exists: README.md and docs/ name real files, modules and anchors,
and every Python snippet in them runs (or, where it needs a server or a cluster, compiles and
its imports resolve).

A snippet that cannot run here is marked in the Markdown, right above its fence, with
`<!-- docs-test: imports only (needs ...) -->`: the test then compiles it and executes its
import statements only.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
IMPORTS_ONLY = re.compile(r"<!-- docs-test: imports only \(needs [^)]+\) -->\s*$")
# Project paths the docs name; a path a user creates (build extras) is not expected to exist.
PATH = re.compile(r"(?<![\w./:-])((?:src|steps|tests|docs|bench|scripts|docker|data)/[\w./*<>-]*)")
USER_CREATED = ("docker/build-extras/",)
PACKAGE = PROJECT_ROOT / "src" / "lightcycle"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
HEREDOC = re.compile(r"^python - <<'(\w+)'[^\n]*\n(.*?)^\1$", re.M | re.S)


def doc_id(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def snippets() -> list[tuple[str, str, bool]]:
    """(where, code, imports_only) for every ```python block and `python - <<'X'` heredoc."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            lang, body = match[1], match[2]
            line = text.count("\n", 0, match.start()) + 1
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            only = bool(IMPORTS_ONLY.search(before))
            if lang == "python":
                found.append((f"{doc_id(doc)}:{line}", body, only))
            elif lang in ("bash", "sh"):
                for heredoc in HEREDOC.finditer(body):
                    found.append((f"{doc_id(doc)}:{line}", heredoc[2], only))
    return found


def test_the_docs_exist_and_the_readme_is_short():
    names = {p.name for p in DOCS}
    assert {"parameters.md", "serving.md", "scaling-out.md", "operations.md",
            "testing.md"} <= names, names
    lines = (PROJECT_ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_project_path_named_exists(doc):
    missing = []
    for path in sorted(set(PATH.findall(doc.read_text()))):
        path = path.rstrip(".")
        if path.startswith(USER_CREATED):
            continue
        if "<" in path:  # a placeholder: `steps/<step>.py` must match at least one file
            pattern = re.sub(r"<[^>]*>", "*", path)
        else:
            pattern = path
        if not list(PROJECT_ROOT.glob(pattern.rstrip("/"))):
            missing.append(path)
    assert not missing, f"{doc_id(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_python_module_and_dotted_name_resolves(doc):
    text = doc.read_text()
    problems = []
    for module in sorted(set(re.findall(r"python -m (lightcycle[\w.]*)", text))):
        if importlib.util.find_spec(module) is None:
            problems.append(f"python -m {module}: no such module")
    for dotted in sorted(set(re.findall(r"`(lightcycle(?:\.\w+)+)", text))):
        parts = dotted.split(".")
        if not PACKAGE.joinpath(parts[1]).is_dir() and not PACKAGE.joinpath(f"{parts[1]}.py").is_file():
            continue  # a tag (`lightcycle.output_uri`), not code
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                problems.append(f"{dotted}: no attribute {attr!r}")
            break
        else:
            problems.append(f"{dotted}: nothing importable")
    assert not problems, f"{doc_id(doc)}: {problems}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_link_to_a_file_and_anchor_resolves(doc):
    def anchors(path: Path) -> set[str]:
        text = FENCE.sub("", path.read_text())
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", text, re.M)}

    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            problems.append(f"{target}: no file {path}")
        elif anchor and anchor not in anchors(path):
            problems.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not problems, f"{doc_id(doc)}: {problems}"


SNIPPETS = snippets()


def test_the_docs_hold_python_snippets():
    assert len(SNIPPETS) >= 2, SNIPPETS  # the parser still finds them


@pytest.mark.parametrize("where,code,imports_only", SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_every_python_snippet_runs_or_at_least_imports(where, code, imports_only, tmp_path):
    tree = compile(code, where, "exec", ast.PyCF_ONLY_AST)  # a SyntaxError names the snippet
    if imports_only:
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert imports, f"{where}: an imports-only snippet with no imports checks nothing"
        code = ast.unparse(ast.Module(body=imports, type_ignores=[]))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{where} failed:\n{code}\n{result.stderr[-3000:]}"
    if not imports_only and result.stdout.lstrip().startswith("{"):
        json.loads(result.stdout)  # a snippet that prints a request body prints valid JSON
