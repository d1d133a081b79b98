"""Start-up check for the known broken install (xds-protos vs opentelemetry-proto).

``xds-protos`` ships its own, older ``opentelemetry/proto/*``. When it is installed
after ``opentelemetry-proto`` it overwrites the newer files and the OTLP exporter fails
with ``cannot import name 'InstrumentationScope'`` (grpc/grpc#42926, unreleased fix in
grpc/grpc#42429). Services call :func:`check_install` at start so the failure is one
clear line with the repairing command, not a traceback deep inside the exporter.
"""

from __future__ import annotations

import sys
from importlib import metadata


class BrokenInstallError(RuntimeError):
    """The installed package set cannot work; the message says the command that repairs it."""


def repair_command() -> str:
    """The one command that restores a working opentelemetry-proto."""
    try:
        version = metadata.version("opentelemetry-proto")
        spec = f"opentelemetry-proto=={version}"
    except metadata.PackageNotFoundError:
        spec = "opentelemetry-proto"
    return f"{sys.executable} -m pip install --force-reinstall --no-deps '{spec}'"


def check_install() -> None:
    """Raise :class:`BrokenInstallError` when the OTLP protos were overwritten."""
    try:
        from opentelemetry.proto.common.v1 import common_pb2

        common_pb2.InstrumentationScope  # noqa: B018 - the attribute is the check
    except (ImportError, AttributeError) as exc:
        raise BrokenInstallError(
            "the installed opentelemetry-proto files were overwritten by xds-protos' older "
            f"copy ({exc}); repair with: {repair_command()}"
        ) from None
