"""dualglow: synthetic FDG-PET from T1-weighted MRI with DUAL-GLOW (Sun et al., ICCV 2019).

Each stage is a plain Python module usable without the CLI; ``dualglow_app.cli`` only parses
arguments and dispatches to them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dualglow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
