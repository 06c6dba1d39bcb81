"""The engine's exceptions: small classes a service can map to status codes in one table.

Input problems are `ValueError` subclasses that carry the offending field (and, for data, the
first offending sample index) as attributes as well as in the message, so a caller can build a
field violation without parsing text. Run-time conditions (cancellation, device memory) are
separate classes because retrying or reporting them is a different decision from fixing input.
"""

from __future__ import annotations


class DataValidationError(ValueError):
    """The samples or labels are unusable; the message names the field, first bad index and range."""

    def __init__(self, message: str, *, field: str, index: int | None = None) -> None:
        super().__init__(message)
        self.field = field  # "features", "labels" or "num_classes"
        self.index = index  # first offending sample, when one sample is at fault


class ConfigError(ValueError):
    """A configuration value is out of its allowed range; the message names the field and range."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class TrainingDiverged(ConfigError):
    """The training loss became NaN or infinite, which a lower learning rate avoids.

    A subclass of ConfigError because the fix is a configuration change: retrying the same
    request with the same seed diverges again.
    """


class Cancelled(Exception):
    """`should_cancel` returned True; training stopped within one batch."""


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory even after halving the batch size the allowed number of times."""
