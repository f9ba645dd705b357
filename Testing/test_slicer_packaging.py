"""The extension's packaging: every CMakeLists.txt lists files that exist, and every module/library
.py and .ui file is listed (only listed files are packaged); each .ui parses, every widget the code
uses and every parameter it binds exists; icons are 128x128 PNGs; the catalog entry agrees with
CMake; the requirements file leaves torch to the PyTorch extension; module files load nothing
heavy at file scope and the logic libraries import no Qt."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path
from xml.etree import ElementTree

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MODULES = ("MAISIGenerate", "MAISITrain")
HEAVY = {"torch", "monai", "maisicore", "numpy", "scipy", "nibabel"}
# maisicore's torch-free constant modules the Slicer libraries import at file scope (their choices and
# defaults are maisicore's, not copies); test_slicer_imports.py checks they load neither torch nor MONAI.
LIGHT_MAISICORE = {"maisicore.models.presets", "maisicore.anatomy.tumors", "maisicore.anatomy.maskgen",
                   "maisicore.training.config"}
QT = {"qt", "ctk", "slicer.qt", "PythonQt"}


# ---- a small CMake reader ------------------------------------------------------------------------


def _cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMakeLists.txt: comments dropped, quotes removed, ``${NAME}`` of
    earlier ``set(NAME value...)`` expanded (a list expands to several arguments)."""
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    variables: dict[str, list[str]] = {}
    commands = []
    for name, body in re.findall(r"(\w+)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text, flags=re.DOTALL):
        args = re.findall(r'"[^"]*"|[^\s"]+', body)
        expanded = []
        for arg in args:
            arg = arg.strip('"')
            for var, value in variables.items():
                arg = arg.replace(f"${{{var}}}", " ".join(value))
            expanded += arg.split()
        if name.lower() == "set" and expanded:
            variables[expanded[0]] = expanded[1:]
        commands.append((name.lower(), expanded))
    return commands


def _listed_files(folder: Path) -> dict[str, list[str]]:
    """SCRIPTS and RESOURCES of the slicerMacroBuildScriptedModule call in ``folder/CMakeLists.txt``."""
    for command, args in _cmake_commands(folder / "CMakeLists.txt"):
        if command == "slicermacrobuildscriptedmodule":
            listed, key = {"NAME": [], "SCRIPTS": [], "RESOURCES": []}, None
            for arg in args:
                if arg in ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR"):
                    key = arg
                elif key in listed:
                    listed[key] += arg.split()
            return listed
    raise AssertionError(f"{folder}/CMakeLists.txt: no slicerMacroBuildScriptedModule call")


def _files(folder: Path, pattern: str) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob(pattern) if "__pycache__" not in p.parts}


def test_top_level_cmake_adds_every_module_and_has_the_metadata():
    commands = _cmake_commands(REPO / "CMakeLists.txt")
    subdirectories = [args[0] for command, args in commands if command == "add_subdirectory"]
    assert subdirectories == ["MAISICore", *MODULES]
    for folder in subdirectories:
        assert (REPO / folder / "CMakeLists.txt").is_file()
    settings = {args[0]: " ".join(args[1:]) for command, args in commands if command == "set" and args}
    assert settings["EXTENSION_CATEGORY"] == "Image Synthesis"
    assert "PyTorch" in settings["EXTENSION_DEPENDS"].split()
    assert settings["EXTENSION_ICONURL"].endswith("/MAISI.png")
    assert [args[0] for command, args in commands if command == "project"] == ["MAISI"]
    # The ExtensionsIndex catalog entry agrees.
    entry = json.loads((REPO / "MAISI.json").read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema")
    assert entry["category"] == settings["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == settings["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == settings["EXTENSION_HOMEPAGE"].rstrip("/")
    # The index lints entries with prettier and prettier-plugin-multiline-arrays (wrap threshold 0):
    # two-space indent, every array item on its own line, which is what json.dumps(indent=2) writes.
    assert (REPO / "MAISI.json").read_text() == json.dumps(entry, indent=2) + "\n"
    # At least one screenshot, a raw URL of a PNG committed here (the index downloads and checks it).
    raw = settings["EXTENSION_HOMEPAGE"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    screenshots = settings["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots and all(url.startswith(raw) for url in screenshots)
    for url in screenshots:
        with Image.open(REPO / url[len(raw):]) as image:
            assert image.format == "PNG" and image.size[0] >= 800


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_exactly_the_module_files(module):
    folder = REPO / module
    listed = _listed_files(folder)
    assert listed["NAME"] == [module]
    for path in listed["SCRIPTS"] + listed["RESOURCES"]:
        assert (folder / path).is_file(), f"{module}/CMakeLists.txt lists {path}, which does not exist"
    assert _files(folder, "*.py") <= set(listed["SCRIPTS"]), "unlisted .py files would not be packaged"
    assert _files(folder, "*.ui") <= set(listed["RESOURCES"])
    assert {f"Resources/Icons/{module}.png", f"Resources/UI/{module}.ui"} <= set(listed["RESOURCES"])
    commands = _cmake_commands(folder / "CMakeLists.txt")
    assert ("slicer_add_python_unittest", ["SCRIPT", f"{module}.py"]) in commands
    assert "WITH_GENERIC_TESTS" in next(args for c, args in commands if c == "slicermacrobuildscriptedmodule")


def test_maisicore_cmake_ships_every_file_of_the_package():
    folder = REPO / "MAISICore"
    listed = _listed_files(folder)
    for path in listed["SCRIPTS"] + listed["RESOURCES"]:
        assert (folder / path).is_file(), f"MAISICore/CMakeLists.txt lists {path}, which does not exist"
    package = folder / "maisicore"
    python = {f"maisicore/{p}" for p in _files(package, "*.py")}
    data = {f"maisicore/{p}" for pattern in ("*.json", "*.md", "*.pt") for p in _files(package, pattern)}
    data |= {"maisicore/requirements.txt"}
    assert python - set(listed["SCRIPTS"]) == set(), "maisicore .py files missing from MAISICore/CMakeLists.txt"
    assert data - set(listed["RESOURCES"]) == set(), "maisicore data files missing from MAISICore/CMakeLists.txt"
    assert not (folder / "MAISICore.py").exists() and "WITH_GENERIC_TESTS" not in (folder / "CMakeLists.txt").read_text()


# ---- .ui files against the code ------------------------------------------------------------------


def _ui_names(path: Path) -> tuple[set[str], dict[str, str], list[ElementTree.Element]]:
    """(widget names, {SlicerParameterName: widget name}, connections) of a Qt Designer file."""
    root = ElementTree.parse(path).getroot()
    widgets = {w.get("name") for w in root.iter("widget")}
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("name")
    return widgets, bound, list(root.iter("connection"))


def _parameter_fields(source: str, class_name: str) -> set[str]:
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_and_matches_the_code(module):
    ui = REPO / module / "Resources" / "UI" / f"{module}.ui"
    widgets, bound, connections = _ui_names(ui)
    source = (REPO / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no ui names?"
    assert used - widgets == set(), f"widgets used in {module}.py but missing from {ui.name}"
    fields = _parameter_fields(source, f"{module}ParameterNode")
    assert set(bound) - fields == set(), "SlicerParameterName properties without a parameter-node field"
    for connection in connections:
        assert connection.findtext("sender") in widgets and connection.findtext("receiver") in widgets
    root_widget = ElementTree.parse(ui).getroot().find("widget")
    assert root_widget.get("class") == "qMRMLWidget" and root_widget.get("name") == module


def test_every_node_selector_gets_the_scene():
    widgets_root = ElementTree.parse(REPO / "MAISIGenerate/Resources/UI/MAISIGenerate.ui").getroot()
    mrml_widgets = {w.get("name") for w in widgets_root.iter("widget")
                    if w.get("class") in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget")}
    receivers = {c.findtext("receiver") for c in widgets_root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml_widgets and mrml_widgets <= receivers


# ---- icons, requirements, imports ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["MAISI.png", "MAISIGenerate/Resources/Icons/MAISIGenerate.png",
                                  "MAISITrain/Resources/Icons/MAISITrain.png"])
def test_icons_are_128_pixel_pngs(path):
    with Image.open(REPO / path) as image:
        assert image.format == "PNG" and image.size == (128, 128)
        assert len(image.convert("RGB").getcolors(maxcolors=128 * 128)) > 50  # a picture, not a flat placeholder


def test_requirements_are_pyprojects_without_torch():
    requirements = (REPO / "MAISICore/maisicore/requirements.txt").read_text().splitlines()
    lines = sorted(line.strip() for line in requirements if line.strip() and not line.startswith("#"))
    project = tomllib.loads((REPO / "MAISICore/pyproject.toml").read_text())["project"]["dependencies"]
    assert lines == sorted(d for d in project if not d.startswith("torch"))
    assert all(">=" in line and "==" not in line for line in lines)
    # torch's lower bound, asked of the PyTorch extension, is pyproject's.
    from MAISIGenerateLib.dependencies import (
        TORCH_REQUIREMENT,
        missing_requirements,
        read_requirements,
    )

    assert f"torch{TORCH_REQUIREMENT}" in project
    assert read_requirements(REPO / "MAISICore/maisicore/requirements.txt") == [
        line.strip() for line in requirements if line.strip() and not line.startswith("#")]
    assert missing_requirements(["numpy>=1.0", "numpy>=999", "no-such-package-for-maisi"]) == [
        "numpy>=999", "no-such-package-for-maisi"]


def _imports(tree: ast.AST, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", [f"{m}/{m}.py" for m in MODULES]
                         + sorted(p.relative_to(REPO).as_posix() for m in MODULES for p in (REPO / m).glob(f"{m}Lib/*.py")))
def test_nothing_heavy_at_file_scope(path):
    """Slicer imports module files at start-up, before torch and MONAI may be installed."""
    imports = _imports(ast.parse((REPO / path).read_text()), top_level_only=True)
    allowed_numpy = "Lib/" in path  # the Qt-free libraries work on arrays
    top = {name.split(".")[0] for name in imports - (LIGHT_MAISICORE if allowed_numpy else set())}
    heavy = top & (HEAVY - ({"numpy"} if allowed_numpy else set()))
    assert heavy == set(), f"{path} imports {heavy} at file scope"


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for m in MODULES for p in (REPO / m).glob(f"{m}Lib/*.py")))
def test_logic_libraries_import_no_qt(path):
    names = _imports(ast.parse((REPO / path).read_text()), top_level_only=False)
    assert {n.split(".")[0] for n in names} & QT == set()
    assert not any(n.startswith("slicer.ScriptedLoadableModule") or n == "slicer.parameterNodeWrapper" for n in names)
