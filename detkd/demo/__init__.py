"""``detkd demo``: the whole story on the embedded synthetic data (``run.py``), explained (``report.py``),
at a scale given by ``scale.py``."""

from detkd.demo.report import conclusion, format_demo, report_markdown
from detkd.demo.run import METHOD, run_demo
from detkd.demo.scale import FULL, QUICK, DemoScale, default_out

__all__ = [
    "FULL",
    "METHOD",
    "QUICK",
    "DemoScale",
    "conclusion",
    "default_out",
    "format_demo",
    "report_markdown",
    "run_demo",
]
