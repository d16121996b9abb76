"""Data files shipped inside the package: link profiles and hardware profiles.

The source is the top-level ``profiles/`` folder; ``aiflow_cli/profiles`` links to it in the source tree and the
wheel carries a copy, so ``lte`` or ``cpu-2core-gpt2`` resolve the same in a checkout and after ``pip install``.
Found through :mod:`importlib.resources`; the package holds a compiled extension, so it is never imported from a
zip and the files are always a real folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: ``profiles/`` as shipped.
PROFILES_DIR = Path(str(resources.files("aiflow_cli") / "profiles"))
#: Link profiles: ``lte`` -> ``LINKS_DIR / "lte.toml"``.
LINKS_DIR = PROFILES_DIR / "links"
#: Hardware (model) profiles: ``cpu-2core-gpt2`` -> ``HARDWARE_DIR / "cpu-2core-gpt2.json"``.
HARDWARE_DIR = PROFILES_DIR / "hardware"


def shipped_names(folder: Path, suffix: str) -> list[str]:
    """Names (file stems) of the shipped files with ``suffix`` in ``folder``, sorted."""
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


__all__ = ["PROFILES_DIR", "LINKS_DIR", "HARDWARE_DIR", "shipped_names"]
