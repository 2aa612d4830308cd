"""Typed errors. The library raises these; the CLI maps them to one line and an exit code.

Exit codes (documented in the README and kept stable):
  0 success, 1 validation failed, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class ParScaleExportError(Exception):
    """Base of every anticipated failure; its message is shown to the user as is."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(ParScaleExportError):
    """config.json is missing, malformed or describes something we cannot export."""


class CheckpointError(ParScaleExportError):
    """Weight files are missing, unsafe, corrupt or disagree with the config."""


class BundleError(ParScaleExportError):
    """An exported bundle is missing, corrupt or does not follow the contract."""


class CapacityError(ParScaleExportError):
    """A fixed-capacity cache (contract version 2 or 3) has no room for the tokens asked of it."""


class OutputError(ParScaleExportError):
    """The output location cannot be used."""


class ProviderError(ParScaleExportError):
    """The requested ONNX Runtime execution provider cannot run here."""


class UsageError(ParScaleExportError):
    """Options or arguments that make no sense together."""


class ServeError(ParScaleExportError):
    """The server cannot start: Ray cannot start or be joined."""


class ValidationFailed(ParScaleExportError):
    """The bundle ran, but its numbers disagree with the reference beyond tolerance."""

    exit_code = EXIT_VALIDATION_FAILED
