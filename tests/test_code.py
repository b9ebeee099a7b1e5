"""Code behaviour: pins agree, entry points match their scripts, light steps stay light."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

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


def test_register_promote_and_main_do_not_import_lightning():
    loaded = _modules_after("import lightcycle.registry, lightcycle.promote, lightcycle.pipeline")
    assert "lightning" not in loaded and "pytorch_lightning" not in loaded
    assert "torch" not in _modules_after("import lightcycle.registry, lightcycle.pipeline")


def test_serving_model_is_self_contained():
    source = (PROJECT_ROOT / "src/lightcycle/serving_model.py").read_text()
    assert "lightcycle" not in re.findall(r"^(?:from|import) (\S+)", source, re.M)
    assert not [m for m in re.findall(r"^(?:from|import) (\S+)", source, re.M)
                if m.split(".")[0] not in {"__future__", "numpy", "pandas", "mlflow", "torch"}]


def test_ci_runs_the_readme_test_command():
    ci = (PROJECT_ROOT / ".ci/run").read_text()
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
