"""The configs that ship with moelab, found by name from any directory after any kind of install.

The repository's ``configs/`` folder (the paths the two user documents write, e.g.
``configs/default.yaml``, ``configs/stead_seismoe.json``) links into this package folder, so the
files a checkout uses and the files a ``pip install .`` ships are the same files.

``resolve_config("default", "diffusion")`` -> ``<package>/configs/diffusion/default.yaml``;
an existing path is returned unchanged, so every path that worked before still works.
"""

from __future__ import annotations

import os
from pathlib import Path

from moelab.errors import ConfigError

#: Folder holding ``diffusion/*.yaml`` and ``seismic/*.json``.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent
SUFFIXES = {"diffusion": (".yaml", ".yml"), "seismic": (".json",)}


def config_dir(app: str) -> Path:
    """The packaged config folder of one application (``diffusion`` or ``seismic``)."""
    if app not in SUFFIXES:
        raise ValueError(f"unknown application {app!r}; use one of {sorted(SUFFIXES)}")
    return PACKAGE_CONFIG_DIR / app


def packaged_names(app: str) -> list[str]:
    """Names (without suffix) of the configs shipped for ``app``."""
    return sorted(p.stem for p in config_dir(app).iterdir() if p.suffix in SUFFIXES[app])


def resolve_config(name_or_path: str | os.PathLike, app: str) -> Path:
    """A config path: ``name_or_path`` itself when it exists, else the packaged config of that name.

    A bare name (``default``, ``digits.yaml``, ``configs/default.yaml`` run from another directory)
    falls back to the packaged file with the same file name. When neither exists the error lists
    the packaged names, so a typo is one look away from its fix.
    """
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"config '{path}' is a folder; pass a {'/'.join(SUFFIXES[app])} file inside it or a packaged config's name")
    if path.exists():
        return path
    stem = path.name
    for suffix in ("", *SUFFIXES[app]):
        candidate = config_dir(app) / f"{stem}{suffix}"
        if candidate.is_file() and (suffix or candidate.suffix in SUFFIXES[app]):
            return candidate
    raise ConfigError(
        f"config '{name_or_path}' does not exist: give a path to a {'/'.join(SUFFIXES[app])} file or the name of a "
        f"packaged {app} config ({', '.join(packaged_names(app))})"
    )
