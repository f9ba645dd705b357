"""``maisi evaluate``: how real (2.5D FID, FRD), how faithful (VAE reconstruction, organ HU against
real-CT statistics) and how diverse (MS-SSIM between seeds) generated CTs are, with a report and a
comparison of two reports. See ``run.evaluate`` and ``report.compare``."""

from .report import compare
from .run import METRICS, collect_cases, evaluate

__all__ = ["METRICS", "collect_cases", "compare", "evaluate"]
