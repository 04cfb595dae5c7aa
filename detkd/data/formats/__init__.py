"""One reader per data format, all yielding detkd.data.sample.ImageRecord / Sample.

Importing this package imports every module in it, so a new built-in format is one new file here
whose reader carries ``@register_format("name")`` (see base.py); no list of formats to extend.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
