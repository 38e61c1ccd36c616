"""User-facing errors: each names the file, key or thing at fault and why.

The CLI turns any ``NestadError`` into one clear line and a non-zero exit code,
never a traceback.
"""


class NestadError(Exception):
    """Base class for errors a user can cause and fix."""


class ConfigError(NestadError):
    """A params.yaml key or CLI override is unknown, mistyped or out of range."""


class DataError(NestadError):
    """An input image, folder, archive or manifest is unusable."""


class TrainingError(NestadError):
    """Training cannot continue (non-finite loss, incompatible checkpoint...)."""


class ModelFileError(NestadError):
    """A saved model or checkpoint is missing, corrupt or incompatible."""


class ValidationFailed(NestadError):
    """A dataset failed its expectation suite; the message names each failed expectation
    and its first offending files."""


class VersioningError(NestadError):
    """A DVC operation (init, add, push, pull, reproduce) failed."""
