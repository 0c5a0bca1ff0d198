"""Errors a user can cause. The CLI prints their message on one line and exits with 2."""


class MlxkitError(Exception):
    """Base class: the message must say what to do about it."""


class CheckpointError(MlxkitError):
    """A model directory is missing, malformed, or not a Qwen 3.5 checkpoint."""


class ConfigError(MlxkitError):
    """A config.json (or a user-given setting) that mlxkit cannot use."""


class ManifestError(MlxkitError):
    """A bundle's manifest.json is missing or unreadable: the input is not a bundle."""
