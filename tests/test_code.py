"""Code behaviour: pins agree, entry points match their scripts, light steps stay light."""

from __future__ import annotations

import graphlib
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import PROJECT_ROOT


def _pins(lines):
    return {m[1].lower(): m[2] for m in (re.match(r"^\s*-?\s*([A-Za-z0-9_.-]+)==(\S+)", l) for l in lines) if m}


def test_pins_agree_across_requirements_pyproject_and_conda():
    requirements = _pins((PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    pyproject = _pins(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    conda = yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    conda_pins = _pins(pip_section)
    assert pyproject == conda_pins
    assert {k: v for k, v in requirements.items() if k in pyproject} == pyproject
    for package, version in {"torch": "2.14.1", "torchvision": "0.29.1", "lightning": "2.6.6",
                             "mlflow": "3.17.2"}.items():
        assert pyproject[package] == version
    # The serving image installs the numpy the models are logged with (model_io pins it).
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG NUMPY_VERSION=(\S+)", dockerfile, re.M)[1] == pyproject["numpy"]


def test_python_floor_is_enforced_where_it_is_needed():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert pyproject["requires-python"] == ">=3.11"
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "sys.version_info < (3, 11)" in makefile and "needs Python >= 3.11" in makefile
    # An interpreter that fails the version check (here: one that fails everything) stops the
    # install at its first line, with the message; -B makes make run the recipe regardless.
    old = subprocess.run(["make", "-B", "venv", "PYTHON=/bin/false"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True)
    assert old.returncode != 0
    assert "needs Python >= 3.11" in old.stderr and "PYTHON=python3.11" in old.stderr


def test_every_entry_point_has_a_step_script_and_typed_params():
    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        script = re.search(r"python (steps/\S+\.py)", entry["command"])[1]
        assert (PROJECT_ROOT / script).is_file(), name
        for param, spec in entry.get("parameters", {}).items():
            assert "type" in spec, f"{name}.{param} has no type"
            assert "{" + param + "}" in entry["command"], f"{name}.{param} is not passed on"


def test_defaults_are_written_as_python_prints_them():
    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
    for entry in project["entry_points"].values():
        for param, spec in entry.get("parameters", {}).items():
            default = spec.get("default")
            if isinstance(default, float):
                assert str(default) == repr(float(default)), param
            assert not re.fullmatch(r"\d+(\.\d+)?e-?\d+", str(default)), f"{param}={default}"


def _modules_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_register_and_main_do_not_import_torch():
    loaded = _modules_after("import lightcycle.lifecycle.registry, lightcycle.lifecycle.pipeline")
    assert "torch" not in loaded


def test_saving_and_loading_a_plain_net_does_not_import_lightning(tmp_path):
    """`import mlflow.pytorch` alone imports pytorch_lightning (about 8 s here); the conversion,
    gate and serving steps load nets through model_io, which keeps it out."""
    code = (
        "import sys\n"
        "from lightcycle.lifecycle import model_io\n"
        "from lightcycle.model.nets import build_net\n"
        "model_io.save_model(build_net('cnn'), sys.argv[1],"
        " pip_requirements=model_io.torch_requirements())\n"
        "print(type(model_io.load_eager_net(sys.argv[1])).__name__)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "net")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "CNN"
    assert not {"lightning", "pytorch_lightning", "torchmetrics"} & set(out[1:])


SRC = PROJECT_ROOT / "src" / "lightcycle"
# subpackage -> module prefixes none of its modules may import, directly or through others.
LAYER_RULES = {
    "model": ("mlflow",),
    "lifecycle": ("lightning", "pytorch_lightning", "lightcycle.training"),
    "serving": ("lightcycle.training", "lightning", "pytorch_lightning"),
}


def _direct_imports(path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(LAYER_RULES))
def test_layers_keep_their_import_rules(package):
    """The model never imports mlflow; the lifecycle never imports Lightning; serving never
    imports training. Checked on each module's own import statements (lazy ones included),
    and on everything importing the whole subpackage loads."""
    forbidden = LAYER_RULES[package]
    modules = sorted(p for p in (SRC / package).glob("*.py"))
    assert modules
    for path in modules:
        bad = {n for n in _direct_imports(path) for f in forbidden if n == f or n.startswith(f + ".")}
        assert not bad, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(bad)}"
    names = ", ".join(f"lightcycle.{package}.{p.stem}" for p in modules if p.stem != "__init__")
    loaded = _modules_after(f"import {names}")
    assert not [m for m in loaded for f in forbidden if m == f or m.startswith(f + ".")]


def test_no_module_of_src_is_part_of_an_import_circle():
    """No chain of imports (lazy ones included) leads from a module of src/ back to itself:
    e.g. the Spark engine calls the training function, and training never imports Spark."""
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph = {name: {m for n in _direct_imports(path) for m in (n, n.rpartition(".")[0])
                    if m in modules and m != name and not name.startswith(m + ".")}
             for name, path in modules.items()}

    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail("import circle: " + " -> ".join(exc.args[1]))


def test_every_module_of_src_imports():
    """The fast tier loads every module once, so an import-time error cannot wait for the slow
    tier (or a user) to find it."""
    import importlib
    import pkgutil

    import lightcycle

    names = [m.name for m in pkgutil.walk_packages(lightcycle.__path__, "lightcycle.")]
    assert len(names) > 30, names
    for name in names:
        importlib.import_module(name)


def test_every_module_opens_with_what_it_is_for():
    for path in sorted(SRC.rglob("*.py")):
        doc = ast_docstring(path)
        assert doc and doc.strip().splitlines()[0].strip(), f"{path} has no opening docstring"


def ast_docstring(path):
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


def test_mlproject_defaults_are_the_ones_in_defaults_py():
    from lightcycle import defaults
    from lightcycle.lifecycle.step_cache import STEP_DEFAULTS
    from lightcycle.lifecycle.tracking import canonical_param

    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
    expected = {
        "train": {**defaults.TRAIN, "resume": True},
        "main": {**{k: defaults.TRAIN[k] for k in project["main"]["parameters"]
                    if k in defaults.TRAIN}, **defaults.CHAIN},
        "tune": {**{k: defaults.TRAIN[k] for k in ("seed", "data_dir", "download", "data_mirror",
                                                   "precision", "accelerator", "num_workers",
                                                   "engine", "num_processes", "spark_master",
                                                   "spark_conf")},
                 **defaults.TUNE, **{k: v for k, v in defaults.CHAIN.items() if k != "force"}},
        "register": STEP_DEFAULTS["register"],
        "torchscript": STEP_DEFAULTS["torchscript"],
        "promote": {**STEP_DEFAULTS["promote"], "model_name": defaults.MODEL_NAME + "-scripted"},
        "lineage": {"model_uri": defaults.SERVE["model_uri"]},
        "serve": defaults.SERVE,
        "predict": {"model_uri": defaults.SERVE["model_uri"], **defaults.PREDICT},
    }
    assert set(expected) == set(project)
    for entry, params in project.items():
        declared = {k: spec["default"] for k, spec in params["parameters"].items() if "default" in spec}
        assert set(declared) == set(expected[entry]), entry
        for name, value in expected[entry].items():
            assert canonical_param(declared[name], value) == canonical_param(value, value), \
                f"MLproject {entry}.{name} = {declared[name]!r}, defaults.py says {value!r}"


def test_no_parameter_default_is_empty():
    """MLflow shell-quotes every value: an empty default reaches a step as '' or worse."""
    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
    for entry, spec in project.items():
        for name, param in spec["parameters"].items():
            assert str(param.get("default", "x")).strip() not in ("", "''"), f"{entry}.{name}"
        assert '"{' not in spec["command"], f"{entry}: MLflow quotes values itself"


def test_serving_model_is_self_contained():
    source = (PROJECT_ROOT / "src/lightcycle/serving/serving_model.py").read_text()
    assert "lightcycle" not in re.findall(r"^(?:from|import) (\S+)", source, re.M)
    assert not [m for m in re.findall(r"^(?:from|import) (\S+)", source, re.M)
                if m.split(".")[0] not in {"__future__", "numpy", "pandas", "mlflow", "torch"}]


def test_ci_runs_the_readme_test_command():
    ci = (PROJECT_ROOT / ".ci/run").read_text()
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
    # Strict: a CI machine that lost a backend is red, not green with the backend skipped.
    assert "export LIGHTCYCLE_STRICT=1" in ci


def test_readme_layout_names_every_module():
    layout = (PROJECT_ROOT / "README.md").read_text().split("## Layout", 1)[1]
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "__init__.py":
            assert f"{path.parent.name}/" in layout or path.parent == SRC, path
            continue
        assert path.name in layout, f"README's Layout does not name {path.relative_to(SRC)}"


def test_code_version_follows_step_code_only(tmp_path):
    """README, tests and benchmarks cannot change what a step does, so editing them keeps the
    cache; one changed line of step code (committed or not) is a new code version."""
    import shutil

    from lightcycle.lifecycle.tracking import code_version

    copy = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "data", "__pycache__", "*.egg-info", "mlruns", "mlartifacts"))
    before = code_version(copy)
    assert before == code_version(PROJECT_ROOT)  # the same content anywhere, git or not
    for path in ("README.md", "tests/test_code.py", "bench/common.py", "BENCHMARKS.md"):
        (copy / path).write_text((copy / path).read_text() + "\n# edited\n")
    assert code_version(copy) == before
    for path in ("src/lightcycle/lifecycle/promote.py", "steps/train.py", "MLproject",
                 "requirements.txt"):
        original = (copy / path).read_text()
        (copy / path).write_text(original + "\n# edited\n")
        assert code_version(copy) != before, path
        (copy / path).write_text(original)
    assert code_version(copy) == before


# The MLflow internals lightcycle still uses, each with the reason in a comment where it is
# used: (module, name, the keyword arguments lightcycle relies on, or None for a non-function).
PRIVATE_MLFLOW = [
    ("mlflow.projects", "_run", {"uri", "experiment_id", "entry_point", "version", "parameters",
                                 "docker_args", "backend_name", "backend_config", "env_manager",
                                 "storage_dir", "synchronous", "run_name", "build_image",
                                 "docker_auth"}),
    ("mlflow.tracking.fluent", "_get_experiment_id", set()),
    ("mlflow.pyfunc.scoring_server", "infer_and_parse_data", {"data", "schema"}),
    ("mlflow.pyfunc.scoring_server", "predictions_to_json",
     {"raw_predictions", "output", "metadata"}),
    ("mlflow.pyfunc.scoring_server", "NumpyEncoder", None),
]


@pytest.mark.parametrize("module, name, keywords", PRIVATE_MLFLOW,
                         ids=[f"{m}.{n}" for m, n, _ in PRIVATE_MLFLOW])
def test_each_private_mlflow_name_is_where_lightcycle_uses_it(module, name, keywords):
    import importlib
    import inspect

    target = getattr(importlib.import_module(module), name, None)
    assert target is not None, f"MLflow moved {module}.{name}: see where src/ uses it"
    where = [str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "src").rglob("*.py")
             if name in p.read_text()]
    assert where, f"{module}.{name} is no longer used: drop it from PRIVATE_MLFLOW"
    if keywords is not None:
        parameters = set(inspect.signature(target).parameters)
        assert keywords <= parameters, (f"{module}.{name} lost {keywords - parameters}", where)


def test_the_scoring_server_still_parses_and_writes_through_the_names_the_deployable_wraps():
    """The deployable replaces two module attributes of MLflow's scoring server; that works
    only while the request handler looks them up there, and while the server announces itself
    through the environment variable the deployable reads."""
    import inspect

    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    # invocations -> _parse_json_data -> infer_and_parse_data; invocations -> predictions_to_json
    assert "predictions_to_json(" in inspect.getsource(scoring_server.invocations)
    assert "_parse_json_data(" in inspect.getsource(scoring_server.invocations)
    assert "infer_and_parse_data(" in inspect.getsource(scoring_server._parse_json_data)
    assert _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name == "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
    assert "_MLFLOW_IS_IN_SERVING_ENVIRONMENT" in inspect.getsource(scoring_server.init)
    assert "_MLFLOW_IS_IN_SERVING_ENVIRONMENT" in (
        PROJECT_ROOT / "src" / "lightcycle" / "serving" / "serving_model.py").read_text()
