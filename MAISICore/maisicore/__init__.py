"""maisicore: NVIDIA's MAISI synthetic CT models (rflow-ct, ddpm-ct) on CPU and GPU.

Python API (arrays indexed (x, y, z), index → RAS affines in mm; see ``maisicore.io.geometry``)::

    from maisicore import GenerateRequest, GeneratePipeline
    request = GenerateRequest(model="demo", mask="labels.nii.gz", seed=1, out="ct.nii.gz")
    pipe = GeneratePipeline.from_request(request)       # the networks, loaded once
    result = pipe(request, progress=lambda stage, done, total: ..., cancel=lambda: False)
    result.write(request)                               # result.ct, result.labels, result.qc, ...

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
    "prepare_generation": "pipelines.generate",
    "GeneratePipeline": "pipelines.generate",
    "GenerateResult": "pipelines.generate",
    "InpaintPipeline": "pipelines.inpaint",
    "GenerateRequest": "pipelines.requests",
    "InpaintRequest": "pipelines.requests",
    "WeightsRequest": "pipelines.requests",
    "read_request": "pipelines.requests",
    "run_request": "pipelines.runner",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"maisicore.{_API[name]}"), name)
    raise AttributeError(f"module 'maisicore' has no attribute {name!r}")
