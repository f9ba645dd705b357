"""The widget layer checked without Slicer (issue 28 item 4).

No Slicer window runs here, and PythonQt forgives the widget layer's mistakes silently: a
``connect("signal(Types)", slot)`` with a signature the class lacks connects nothing, a misspelt
property assignment sets a Python attribute, a ``.ui`` class that is not a Designer plugin is not
created, a ``self.ui.NAME`` missing from the ``.ui`` fails only when that line runs. So each module's
``.ui`` file and widget code (the module file and its ``*Lib`` folder, read with ``ast``, never imported)
are checked against what the classes really declare:

- Slicer's and CTK's classes: ``shared/reference/slicer-api/slicer_widget_api.json`` (bases, Q_PROPERTY
  properties, signals, slots, invokables, clones, Designer plugins, parameterNodeWrapper GUI connectors;
  see its README). Absent (no ``../shared``, ``$MAISI_SHARED`` unset): the tests skip.
- Qt's own classes: ``Testing/data/qt_widget_signals.json``, the meta-objects of Qt 5's QtWidgets classes
  (and their QtCore/QtGui bases), written by ``Testing/data/make_qt_widget_signals.py``.

Everything is data-driven: every widget of the ``.ui`` files and every connect, property assignment and
method call on an object whose class can be told from the code (``self.ui.NAME``, ``x = qt.QCheckBox()``,
``self.field = ctk.ctkPathLineEdit()``, ``slicer.app``, ``slicer.util.loadUI(...)``) is checked, so new
widgets are covered without listing them here. A ``connect("...")`` whose receiver cannot be told fails:
make its class visible (a ``self.ui`` name or a constructor assignment) rather than leave it unchecked.
"""

from __future__ import annotations

import ast
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ("MAISIGenerate", "MAISITrain")
QT_FILE = Path(__file__).resolve().parent / "data" / "qt_widget_signals.json"
# Names every PythonQt wrapper has besides the class's own (PythonQt's object protocol).
PYTHONQT_EXTRAS = {"connect", "disconnect", "className", "delete", "help", "inherits", "setProperty", "property"}
PREFIXES = {"qt", "ctk", "slicer"}  # the Python modules that hold the Qt classes in Slicer
# Bases outside both files: Slicer's Base/QTCore is not in the API file (no widgets there). A class with
# such a base has an incomplete chain: what is found on it is checked, what is not found cannot be
# called wrong (qSlicerCoreApplication's own properties, e.g. slicer.app.temporaryPath).
OUTSIDE_BASES = {"qSlicerCoreApplication": ["QApplication"]}


def api_dir() -> Path:
    return Path(os.environ.get("MAISI_SHARED", REPO.parent / "shared")) / "reference" / "slicer-api"


def normalise(signature: str) -> str:
    """Qt's normalised form of a signal signature as written in Python: no spaces, no const, no &."""
    text = re.sub(r"\bconst\s+", "", signature)
    text = text.replace("&", "")
    return re.sub(r"\s+", "", text)


def method_name(signature: str) -> str:
    return signature.split("(", 1)[0]


class Api:
    """Slicer's, CTK's and Qt's classes, walked through their bases."""

    def __init__(self, slicer_api: dict, qt_api: dict) -> None:
        self.slicer = slicer_api["classes"]
        self.qt = qt_api["classes"]
        self.designer_plugins = set(slicer_api["designer_plugins"])
        self.connectors = slicer_api["gui_connectors"]

    def known(self, cls: str) -> bool:
        return cls in self.slicer or cls in self.qt

    def chain(self, cls: str) -> list[str]:
        """The class and all its bases (depth first), known ones only; QObject always last."""
        seen, todo = [], [cls]
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            entry = self.slicer.get(name) or self.qt.get(name)
            if entry is None:
                todo.extend(OUTSIDE_BASES.get(name, []))
                continue
            seen.append(name)
            todo.extend(entry.get("bases", []))
        if "QObject" not in seen:  # bases outside both files (e.g. qSlicerCoreApplication) end at QObject
            seen.append("QObject")
        return seen

    def complete(self, cls: str) -> bool:
        """False when the class, or a base in its chain, is described in neither file."""
        if not self.known(cls):
            return False
        for name in self.chain(cls):
            entry = self.slicer.get(name) or self.qt.get(name)
            if any(not self.known(base) for base in entry.get("bases", [])):
                return False
        return True

    def entries(self, cls: str):
        for name in self.chain(cls):
            yield name, self.slicer.get(name) or self.qt.get(name)

    def signals(self, cls: str) -> set[str]:
        result = set()
        for _, entry in self.entries(cls):
            own = set(entry.get("signals", []))
            names = {method_name(s) for s in own}
            # clones: the shorter signatures moc registers for trailing default arguments (signals' ones)
            own |= {c for c in entry.get("clones", []) if method_name(c) in names}
            result |= own
        return result

    def properties(self, cls: str) -> dict[str, str]:
        result = {}
        for _, entry in self.entries(cls):
            for name, kind in entry.get("properties", {}).items():
                result.setdefault(name, kind)
        return result

    def callables(self, cls: str) -> set[str]:
        """Names Python can call on an instance: slots, invokables, signals (emit), and for Qt's
        classes their public methods (PythonQt wraps all of them; of Slicer's/CTK's only the
        meta-object's)."""
        result = set(PYTHONQT_EXTRAS)
        for _, entry in self.entries(cls):
            for key in ("slots", "invokables", "signals", "clones"):
                result |= {method_name(s) for s in entry.get(key, [])}
            result |= set(entry.get("methods", []))
        return result


@dataclass
class Ui:
    """One .ui file: object name -> class, property names set on each, dynamic properties."""

    path: Path
    root_class: str = ""
    objects: dict[str, str] = field(default_factory=dict)
    properties: list[tuple[str, str, str]] = field(default_factory=list)  # (object, class, property)
    parameters: list[tuple[str, str, str]] = field(default_factory=list)  # (object, class, SlicerParameterName)


def read_ui(path: Path, text: str | None = None) -> Ui:
    """The .ui file at path (or, given, its text)."""
    ui = Ui(path)
    root = ET.fromstring(text) if text is not None else ET.parse(path).getroot()
    top = root.find("widget")
    ui.root_class = top.get("class")
    for tag in ("widget", "layout", "action"):
        for element in root.iter(tag):
            cls = element.get("class", "QAction" if tag == "action" else None)
            name = element.get("name")
            if name:
                ui.objects[name] = cls
            for prop in element.findall("property"):  # direct children only: not <item>'s or <column>'s
                if prop.get("stdset") == "0":  # a dynamic property
                    if prop.get("name") == "SlicerParameterName":
                        ui.parameters.append((name, cls, (prop.findtext("string") or "").strip()))
                    continue
                ui.properties.append((name, cls, prop.get("name")))
    return ui


def code_files(module: str) -> list[Path]:
    return [REPO / module / f"{module}.py", *sorted((REPO / module / f"{module}Lib").glob("*.py"))]


def source(path: Path, sources: dict[Path, str] | None) -> str:
    """The file's text, or the text given for it in sources (the self-test's altered copies)."""
    return sources[path] if sources and path in sources else path.read_text(encoding="utf-8")


# ---- the code: which class each expression is


@dataclass
class Finding:
    where: str
    cls: str
    what: str
    node: ast.AST


class CodeScan:
    """Every ``self.ui.NAME``, connect, property assignment and method call in one module's code, with
    the class of the object it is made on where that can be told."""

    def __init__(self, module: str, ui: Ui, api: Api, sources: dict[Path, str] | None = None) -> None:
        self.ui, self.api = ui, api
        self.ui_names: list[tuple[str, str]] = []  # (where, NAME)
        self.string_connects: list[tuple[str, str | None, str, str]] = []  # (where, class, signature, receiver)
        self.attribute_connects: list[tuple[str, str, str]] = []  # (where, class, signal name)
        self.assignments: list[tuple[str, str, str]] = []  # (where, class, property)
        self.calls: list[tuple[str, str, str]] = []  # (where, class, method)
        self.reads: list[tuple[str, str, str]] = []  # (where, class, attribute read, not called)
        for path in code_files(module):
            tree = ast.parse(source(path, sources), filename=str(path))
            self._scan_module(tree, path.relative_to(REPO))

    # -- class resolution

    def _resolve(self, node: ast.AST, local: dict[str, str], fields: dict[str, str]) -> str | None:
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Attribute) and _is_self(node.value.value) and node.value.attr == "ui":
                return self.ui.objects.get(node.attr)
            if _is_self(node.value):
                return fields.get(node.attr)
            if isinstance(node.value, ast.Name) and node.value.id == "slicer" and node.attr == "app":
                return "qSlicerApplication"
            return None
        if isinstance(node, ast.Name):
            return local.get(node.id)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in PREFIXES:
                return func.attr if self.api.known(func.attr) else None
            if _dotted(func) == "slicer.util.loadUI":
                return self.ui.root_class
        return None

    def _types(self, body: ast.AST, fields: dict[str, str], target_kind: str) -> dict[str, str]:
        """name -> class for the plain names (target_kind "name") or self.fields ("self") assigned in
        body from an expression of known class; a name given two different classes is left out."""
        found: dict[str, set] = {}
        for node in ast.walk(body):
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts))
                for t, v in pairs:
                    key = None
                    if target_kind == "name" and isinstance(t, ast.Name):
                        key = t.id
                    elif target_kind == "self" and isinstance(t, ast.Attribute) and _is_self(t.value):
                        key = t.attr
                    if key is not None:
                        found.setdefault(key, set()).add(self._resolve(v, {}, fields))
        return {k: next(iter(v)) for k, v in found.items() if len(v) == 1 and None not in v}

    # -- scanning

    def _scan_module(self, tree: ast.Module, path: Path) -> None:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                fields = self._types(node, {}, "self")
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self._scan_function(item, fields, path, f"{node.name}.{item.name}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._scan_function(node, {}, path, node.name)

    def _scan_function(self, function: ast.AST, fields: dict[str, str], path: Path, qualname: str) -> None:
        local = self._types(function, fields, "name")
        called = set()  # the f of every f(...) and the signal of every widget.signal.connect(...)
        for node in ast.walk(function):
            if isinstance(node, ast.Call):
                called.add(id(node.func))
                if isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
                    called.add(id(node.func.value))
        for node in ast.walk(function):
            where = f"{path}:{getattr(node, 'lineno', '?')} ({qualname})"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and _is_self(node.value.value) and node.value.attr == "ui"):
                self.ui_names.append((where, node.attr))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = node.func.value
                if node.func.attr == "connect":
                    if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                        cls = self._resolve(receiver, local, fields)
                        self.string_connects.append((where, cls, node.args[0].value, ast.unparse(receiver)))
                    elif isinstance(receiver, ast.Attribute):  # widget.signalName.connect(slot)
                        cls = self._resolve(receiver.value, local, fields)
                        if cls is not None:
                            self.attribute_connects.append((where, cls, receiver.attr))
                    continue
                cls = self._resolve(receiver, local, fields)
                if cls is not None:
                    self.calls.append((where, cls, node.func.attr))
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in called:
                cls = self._resolve(node.value, local, fields)
                if cls is not None:
                    self.reads.append((where, cls, node.attr))
            targets = []
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    targets += target.elts if isinstance(target, ast.Tuple) else [target]
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    cls = self._resolve(target.value, local, fields)
                    if cls is not None:
                        self.assignments.append((where, cls, target.attr))


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


# ---- the parameter node


@dataclass
class Parameter:
    base: str  # "int", "str", "vtkMRMLSegmentationNode", "pathlib.Path", a pack's class name ...
    union: list[str]  # the members of a Union / X | None (without None); [base] otherwise
    annotations: set[str]  # Choice, WithinRange, Minimum, Maximum, RangeBounds, Default ...


def _parameter(annotation: ast.AST) -> Parameter:
    notes: set[str] = set()
    if isinstance(annotation, ast.Subscript) and _dotted(annotation.value).split(".")[-1] == "Annotated":
        elts = annotation.slice.elts
        annotation = elts[0]
        notes = {_dotted(e.func).split(".")[-1] for e in elts[1:] if isinstance(e, ast.Call)}
    members: list[ast.AST] = [annotation]
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        members = [annotation.left, annotation.right]
    elif isinstance(annotation, ast.Subscript) and _dotted(annotation.value).split(".")[-1] in ("Optional", "Union"):
        members = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
    names = [_dotted(m) for m in members if not (isinstance(m, ast.Constant) and m.value is None)]
    names = [n for n in names if n != "None"]
    return Parameter(names[0] if len(names) == 1 else "Union", names, notes)


def parameter_classes(module: str, sources: dict[Path, str] | None = None
                      ) -> tuple[dict[str, dict[str, Parameter]], dict[str, dict[str, Parameter]], set]:
    """(parameter node classes, parameter pack classes, enum class names), each class: name -> Parameter."""
    nodes, packs, enums = {}, {}, set()
    for path in code_files(module):
        for node in ast.walk(ast.parse(source(path, sources))):
            if not isinstance(node, ast.ClassDef):
                continue
            if any(_dotted(b).split(".")[-1] in ("Enum", "IntEnum", "StrEnum") for b in node.bases):
                enums.add(node.name)
            decorators = {_dotted(d.func if isinstance(d, ast.Call) else d).split(".")[-1] for d in node.decorator_list}
            members = {item.target.id: _parameter(item.annotation) for item in node.body
                       if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
            if "parameterNodeWrapper" in decorators:
                nodes[node.name] = members
            elif "parameterPack" in decorators:
                packs[node.name] = members
    return nodes, packs, enums


def _type_fits(parameter: Parameter, accepted: str, enums: set) -> bool:
    if accepted in ("bool", "int", "float", "str"):
        return parameter.base == accepted
    if accepted == "isNodeOrUnionOfNodes(datatype)":
        return all(re.fullmatch(r"(slicer\.)?vtkMRML\w*Node", name) for name in parameter.union)
    if accepted == "subclass of enum.Enum":
        return parameter.base.split(".")[-1] in enums
    # pathlib.Path, FloatRange, qt.QColor ...: by the last dotted component (however it was imported)
    return parameter.base.split(".")[-1] == accepted.split(".")[-1]


def binding_problems(widget_class: str, parameter: Parameter, api: Api, enums: set) -> str | None:
    """None when parameterNodeWrapper binds this widget class (exact type) to this parameter, else why not."""
    candidates = [c for c in api.connectors if c["widget"].split(".")[-1] == widget_class]
    if not candidates:
        return f"no GUI connector for widget class {widget_class}"
    fitting = [c for c in candidates if any(_type_fits(parameter, t, enums) for t in c["types"])]
    if not fitting:
        accepted = sorted({t for c in candidates for t in c["types"]})
        return f"{widget_class} binds {accepted}, not {parameter.base}"
    problems = []
    for connector in fitting:
        for condition in connector.get("raises", []):
            applies = True
            classes = re.findall(r"\b(?:qt|ctk|slicer)\.(\w+)", condition.split(":", 1)[0])
            if classes and widget_class not in classes:
                applies = False
            bounded = "WithinRange" in parameter.annotations or {"Minimum", "Maximum"} <= parameter.annotations
            if applies and "not isBounded" in condition and not bounded:
                problems.append(condition)
            if applies and "choice is None" in condition and "Choice" not in parameter.annotations:
                problems.append(condition)
            if applies and "rangeBounds is None" in condition and "RangeBounds" not in parameter.annotations:
                problems.append(condition)
        if not problems:
            return None
    return "; ".join(problems)


# ---- fixtures


@pytest.fixture(scope="module")
def api() -> Api:
    path = api_dir() / "slicer_widget_api.json"
    if not path.is_file():
        pytest.skip(f"Slicer's widget API not found at {path} (set MAISI_SHARED to the shared/ folder)")
    return Api(json.loads(path.read_text(encoding="utf-8")), json.loads(QT_FILE.read_text(encoding="utf-8")))


@dataclass
class Module:
    """One module as the checks see it: its .ui objects, its code's uses, its parameter node."""

    name: str
    ui: Ui
    scan: CodeScan
    parameters: tuple


def load_module(name: str, api: Api, sources: dict[Path, str] | None = None) -> Module:
    """The module's .ui files (one namespace, as childWidgetVariables of each loaded .ui gives) and code;
    sources: altered texts to read instead of some files (the self-test)."""
    uis = sorted((REPO / name / "Resources" / "UI").glob("*.ui"))
    assert uis, f"{name} has no .ui file"
    ui = read_ui(uis[0], source(uis[0], sources))
    for other in uis[1:]:
        extra = read_ui(other, source(other, sources))
        ui.objects.update(extra.objects)
        ui.properties += extra.properties
        ui.parameters += extra.parameters
    return Module(name, ui, CodeScan(name, ui, api, sources), parameter_classes(name, sources))


@pytest.fixture(scope="module", params=MODULES)
def module(request, api) -> Module:
    return load_module(request.param, api)


def report(name: str, what: str, checked: int, failures: list[str]) -> None:
    print(f"\n{name}: {checked} {what} checked, {len(failures)} wrong")
    assert checked > 0, f"{name}: no {what} found to check: is the scan broken?"
    assert not failures, f"{name}: {len(failures)} wrong {what}:\n  " + "\n  ".join(failures)


# ---- the checks: each returns (how many things it checked, what is wrong)


def check_classes(m: Module, api: Api) -> tuple[int, list[str]]:
    failures = []
    for obj, cls in m.ui.objects.items():
        if cls not in api.qt and cls not in api.designer_plugins:
            known = "a Slicer/CTK class without a Designer plugin" if cls in api.slicer else "an unknown class"
            failures.append(f"{m.ui.path.name}: {obj} is a {cls}: {known}")
    return len(m.ui.objects), failures


def check_ui_names(m: Module, api: Api) -> tuple[int, list[str]]:
    failures = [f"{where}: self.ui.{attr} is not in {m.ui.path.name}" for where, attr in m.scan.ui_names
                if attr not in m.ui.objects]
    return len(m.scan.ui_names), failures


def check_signals(m: Module, api: Api) -> tuple[int, list[str]]:
    failures = []
    for where, cls, signature, receiver in m.scan.string_connects:
        if cls is None:
            failures.append(f"{where}: {receiver}.connect({signature!r}): the receiver's class cannot be told "
                            "from the code (use self.ui.NAME or assign it from its constructor)")
            continue
        if normalise(signature) not in api.signals(cls) and api.complete(cls):
            same = sorted(s for s in api.signals(cls) if method_name(s) == method_name(normalise(signature)))
            hint = f" (it has {', '.join(same)})" if same else ""
            failures.append(f"{where}: {receiver} is a {cls}, which has no signal {signature!r}{hint}")
    for where, cls, signal in m.scan.attribute_connects:
        if signal not in {method_name(s) for s in api.signals(cls)} and api.complete(cls):
            failures.append(f"{where}: a {cls} has no signal {signal!r}")
    return len(m.scan.string_connects) + len(m.scan.attribute_connects), failures


def check_properties(m: Module, api: Api) -> tuple[int, list[str]]:
    failures = []
    for obj, cls, prop in m.ui.properties:
        if prop not in api.properties(cls) and api.complete(cls):
            failures.append(f"{m.ui.path.name}: {obj} ({cls}) has no property {prop!r}")
    for where, cls, prop in m.scan.assignments:
        if prop not in api.properties(cls) and api.complete(cls):
            failures.append(f"{where}: a {cls} has no property {prop!r}")
    for where, cls, prop in m.scan.reads:  # read, not assigned: a property, or a method/signal passed on
        if prop not in api.properties(cls) and prop not in api.callables(cls) and api.complete(cls):
            failures.append(f"{where}: a {cls} has no property {prop!r}")
    return len(m.ui.properties) + len(m.scan.assignments) + len(m.scan.reads), failures


def check_methods(m: Module, api: Api) -> tuple[int, list[str]]:
    failures = [f"{where}: a {cls} has no method {method!r}() that Python can call"
                for where, cls, method in m.scan.calls if method not in api.callables(cls) and api.complete(cls)]
    return len(m.scan.calls), failures


def check_bindings(m: Module, api: Api) -> tuple[int, list[str]]:
    nodes, packs, enums = m.parameters
    assert nodes, f"{m.name}: no @parameterNodeWrapper class found"
    failures = []
    for obj, cls, parameter_name in m.ui.parameters:
        found = []
        for node_name, members in nodes.items():
            scope, parameter = members, None
            for part in parameter_name.split("."):
                parameter = scope.get(part)
                if parameter is None:
                    break
                scope = packs.get(parameter.base.split(".")[-1], {})
            if parameter is not None:
                found.append((node_name, parameter))
        if not found:
            failures.append(f"{m.ui.path.name}: {obj} ({cls}) is bound to {parameter_name!r}, "
                            f"which is not a parameter of {', '.join(nodes)}")
            continue
        for node_name, parameter in found:
            problem = binding_problems(cls, parameter, api, enums)
            if problem:
                failures.append(f"{m.ui.path.name}: {obj} ({cls}) bound to {node_name}.{parameter_name} "
                                f"({parameter.base}): {problem}")
    return len(m.ui.parameters), failures


# ---- the tests


def test_ui_classes_are_qt_or_designer_plugins(module, api):
    """Every class a .ui names is Qt's own or one of Slicer's/CTK's Designer plugins (anything else is
    not created when the .ui loads)."""
    report(module.name, "widget/layout classes", *check_classes(module, api))


def test_self_ui_names_exist(module, api):
    """Every ``self.ui.NAME`` the code uses is an object of the module's .ui."""
    report(module.name, "self.ui names", *check_ui_names(module, api))


def test_connected_signals_exist(module, api):
    """Every ``connect("signal(Types)", ...)`` names a signal (or its clone) of the receiver's class or
    its bases, and every ``widget.signal.connect(...)`` a signal name."""
    report(module.name, "connections", *check_signals(module, api))


def test_properties_exist(module, api):
    """Every property a .ui sets (not the dynamic ones, stdset="0") and every attribute the code assigns
    (or reads) on a widget of known class is a Q_PROPERTY of that class or its bases (PythonQt turns a
    misspelt one into a Python attribute that does nothing)."""
    m = module
    slicer_ctk = sum(1 for _, cls, _ in [*m.ui.properties, *m.scan.assignments, *m.scan.reads] if cls in api.slicer)
    print(f"\n{m.name}: {len(m.ui.properties)} in the .ui, {len(m.scan.assignments)} assigned and "
          f"{len(m.scan.reads)} read in the code; {slicer_ctk} of them on Slicer/CTK classes")
    report(m.name, "properties (.ui + code)", *check_properties(m, api))


def test_called_methods_exist(module, api):
    """Every method the code calls on a widget of known class exists: for Slicer's/CTK's classes a slot,
    invokable or signal (PythonQt exposes nothing else of theirs) or a method of a Qt base; for Qt's a
    public method."""
    report(module.name, "method calls", *check_methods(module, api))


def test_parameter_bindings(module, api):
    """Every ``SlicerParameterName`` of the .ui names a parameter of the module's parameter node (a
    dotted name walks into a parameter pack) and its widget class has a GUI connector for that
    parameter's type, with the annotations the connector needs (Choice for combo boxes, bounds for sliders)."""
    report(module.name, "parameter bindings", *check_bindings(module, api))


def _line(where: str) -> int:
    return int(where.split(":")[1].split(" ")[0])


def _alter_line(text: str, line: int, old: str, new: str) -> str:
    lines = text.splitlines(keepends=True)
    assert old in lines[line - 1], (line, old)
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    return "".join(lines)


def test_checks_catch_deliberate_mistakes(api):
    """The checks fail on a copy of MAISIGenerate with four mistakes PythonQt would let pass silently,
    chosen from what the module really uses (so this keeps working as the module changes): a wrong
    signature in a connect to a Slicer/CTK widget, a self.ui name not in the .ui, a misspelt property
    in the .ui on a Slicer/CTK widget, a SlicerParameterName that is no parameter."""
    real = load_module("MAISIGenerate", api)
    code_path = code_files("MAISIGenerate")[0]
    ui_path = real.ui.path
    code, ui_text = code_path.read_text(encoding="utf-8"), ui_path.read_text(encoding="utf-8")

    where, cls, signature, receiver = next(c for c in real.scan.string_connects
                                           if c[1] in api.slicer and api.complete(c[1]))
    wrong_signature = method_name(signature) + "(QObject*,QObject*)"
    code = _alter_line(code, _line(where), f'"{signature}"', f'"{wrong_signature}"')
    connect_lines = {_line(c[0]) for c in real.scan.string_connects}
    ui_where, ui_name = next(u for u in real.scan.ui_names if _line(u[0]) not in connect_lines)
    code = _alter_line(code, _line(ui_where), f"self.ui.{ui_name}", f"self.ui.{ui_name}Typo")
    obj, prop_cls, prop = next(p for p in real.ui.properties if p[1] in api.slicer and p[0] != real.ui.root_class)
    ui_text = ui_text.replace(f'<widget class="{prop_cls}" name="{obj}">\n', f'<widget class="{prop_cls}" name="{obj}">\n'
                              f'<property name="{prop}Typo"><bool>true</bool></property>\n', 1)
    bound_obj, _, parameter_name = real.ui.parameters[0]
    ui_text = ui_text.replace(f"<string>{parameter_name}</string>", f"<string>{parameter_name}Typo</string>", 1)

    altered = load_module("MAISIGenerate", api, {code_path: code, ui_path: ui_text})
    expected = {
        check_signals: f"{receiver} is a {cls}, which has no signal '{wrong_signature}'",
        check_ui_names: f"self.ui.{ui_name}Typo is not in {ui_path.name}",
        check_properties: f"{obj} ({prop_cls}) has no property '{prop}Typo'",
        check_bindings: f"{bound_obj} (", }
    # Each check finds its one new mistake (and only it: the module's own state is the other tests' job).
    for check, message in expected.items():
        before, after = check(real, api)[1], check(altered, api)[1]
        new = [f for f in after if f not in before]
        assert len(after) == len(before) + 1 and len(new) == 1 and message in new[0], (check.__name__, new)
    assert any(f"'{parameter_name}Typo', which is not a parameter" in f for f in check_bindings(altered, api)[1])
    for check in (check_classes, check_methods):
        assert check(altered, api)[1] == check(real, api)[1], check.__name__
