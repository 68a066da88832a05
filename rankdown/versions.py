"""The installed versions of the packages a manifest or report names (absent ones are left out)."""

from __future__ import annotations

import importlib.metadata


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
