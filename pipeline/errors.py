"""The one error hierarchy of ScarWatch.

Every expected failure raises a subclass of :class:`ScarWatchError`. Each subclass also inherits the
builtin it resembles, so callers may catch either. Messages name the file, the place and the fix; the
CLI prints them as one line and exits with status 2.
"""

from __future__ import annotations


class ScarWatchError(Exception):
    """Root of every error ScarWatch raises on purpose."""


class ConfigError(ScarWatchError, ValueError):
    """params.yaml (or a CLI option) is missing a value or holds an invalid one."""


class InputError(ScarWatchError, ValueError):
    """An input file or folder is missing, empty or holds data the stage cannot use."""


class MissingInputError(InputError, FileNotFoundError):
    """A required input file or folder does not exist."""


class CorruptFileError(InputError, OSError):
    """A file exists but cannot be read (truncated, corrupt or not the expected format)."""


class CRSError(InputError):
    """A dataset has no CRS, or CRSs disagree where they must not."""


class CRSMismatchError(CRSError):
    """Two datasets that must share a CRS do not."""


class NoOverlapError(InputError):
    """Two epochs (or a layer and the imagery) do not overlap."""


class BandMismatchError(InputError):
    """Band counts or dtypes differ between epochs, or a band index is out of range."""


class ModelError(ScarWatchError, ValueError):
    """A checkpoint is missing, corrupt or does not fit the data (architecture, bands)."""


class LedgerError(ScarWatchError, ValueError):
    """A ledger event or field update is invalid (unknown case, illegal transition, bad field)."""


class IllegalTransitionError(LedgerError):
    """A case event that its current lifecycle state does not allow."""


class DeviceError(ConfigError, ModelError):
    """The device a stage is asked to run on (``detect.device``, ``train.device``) is unknown or absent.

    Both a setting error and a model error: callers that catch either keep catching it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when it has none), to quote in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
