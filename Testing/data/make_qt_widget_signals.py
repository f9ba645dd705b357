"""Writes qt_widget_signals.json beside this file: for Qt 5's QObject classes of QtWidgets (and the
QtCore/QtGui bases they and Slicer's/CTK's widgets derive from) their base, their own Q_PROPERTY
properties, signals, slots and invokables (Qt-normalised signatures, clones included, as
``QMetaObject`` registers them) and the names of their other public methods (PythonQt wraps every public
method of a Qt class). Read from the meta-objects of a Qt 5 binding, the Qt major version Slicer builds
against; run once by hand, not by the tests, in a throw-away environment:

    python -m venv /tmp/qtenv && /tmp/qtenv/bin/pip install PyQt5
    QT_QPA_PLATFORM=offscreen /tmp/qtenv/bin/python Testing/data/make_qt_widget_signals.py

PyQt5 is not a dependency of the project: the JSON file is what the test reads."""

import json
from pathlib import Path

from PyQt5 import QtCore, QtGui, QtWidgets
from PyQt5.QtCore import QMetaMethod

EXTRA = (QtCore.QObject, QtCore.QTimer, QtCore.QCoreApplication, QtGui.QGuiApplication, QtCore.QAbstractItemModel,
         QtCore.QItemSelectionModel, QtGui.QValidator)
KINDS = {QMetaMethod.Signal: "signals", QMetaMethod.Slot: "slots", QMetaMethod.Method: "invokables"}


def describe(cls) -> dict:
    meta = cls.staticMetaObject
    superclass = meta.superClass()
    entry = {"bases": [superclass.className()] if superclass is not None else [], "properties": {},
             "signals": [], "slots": [], "invokables": []}
    for i in range(meta.propertyOffset(), meta.propertyCount()):
        prop = meta.property(i)
        entry["properties"][prop.name()] = prop.typeName()
    for i in range(meta.methodOffset(), meta.methodCount()):
        method = meta.method(i)
        if method.access() == QMetaMethod.Private:
            continue
        entry[KINDS[method.methodType()]].append(bytes(method.methodSignature()).decode())
    inherited = set(dir(cls.__mro__[1]))  # sip creates methods lazily: dir() sees them, vars() does not
    entry["methods"] = sorted(name for name in set(dir(cls)) - inherited
                              if not name.startswith("_") and callable(getattr(cls, name)))
    return entry


def main() -> None:
    classes = {}
    candidates = [getattr(QtWidgets, name) for name in dir(QtWidgets)] + list(EXTRA)
    for candidate in candidates:
        if not (isinstance(candidate, type) and issubclass(candidate, QtCore.QObject)):
            continue
        for cls in candidate.__mro__:  # its bases too (QtCore/QtGui ones reached from QtWidgets)
            if issubclass(cls, QtCore.QObject) and cls.__module__.startswith("PyQt5"):
                if cls.staticMetaObject.className() == cls.__name__:
                    classes[cls.__name__] = describe(cls)
    for name in list(classes):
        for base in classes[name]["bases"]:
            if base not in classes:
                raise SystemExit(f"base {base} of {name} not described: add it to EXTRA")
    out = {"source": f"PyQt5 {QtCore.PYQT_VERSION_STR} on Qt {QtCore.QT_VERSION_STR}: QMetaObject of each class "
                     "(own properties/signals/slots/invokables, clones included; private methods left out) and "
                     "the class's own public method names",
           "classes": dict(sorted(classes.items()))}
    path = Path(__file__).with_name("qt_widget_signals.json")
    path.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{len(classes)} classes -> {path}")


if __name__ == "__main__":
    main()
