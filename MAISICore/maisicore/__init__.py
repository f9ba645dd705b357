"""maisicore: NVIDIA's MAISI synthetic CT models (rflow-ct, ddpm-ct) on CPU and GPU.

Python API (arrays indexed (x, y, z), index → RAS affines in mm; see ``maisicore.io.geometry``)::

    from maisicore import Volume, get_preset, load_model, plan_generation, generate
    model = load_model(get_preset("rflow-ct", "tiny"), "weights/", device="cpu")
    plan = plan_generation(model.preset, mask=Volume(labels, affine))
    ct = generate(model, plan, seed=1, progress=lambda stage, done, total: ..., cancel=lambda: False)

Heavy dependencies (torch, MONAI) are imported by the submodules that need them.
"""

__version__ = "0.1.0"

_API = {
    "Volume": "io.geometry",
    "InputError": "errors",
    "Cancelled": "errors",
    "get_preset": "models.presets",
    "load_model": "models.weights",
    "resolve_model": "models.weights",
    "plan_generation": "pipelines.generate",
    "generate": "pipelines.generate",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"maisicore.{_API[name]}"), name)
    raise AttributeError(f"module 'maisicore' has no attribute {name!r}")
