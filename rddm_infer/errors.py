"""User-facing errors: the CLI prints these as one line (no traceback)."""


class RDDMError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class CheckpointError(RDDMError):
    """A checkpoint or artifact that cannot be loaded (missing, corrupt, unsafe, mismatched)."""


class ImageError(RDDMError):
    """An input image that cannot be read, or an output that cannot be written."""


class BackendUnavailable(RDDMError):
    """A backend whose package or hardware is absent on this machine."""


class OptionError(RDDMError, ValueError):
    """An option that is unknown, mistyped, or does not apply to the chosen backend or artifact."""


class ClusterLost(RDDMError):
    """The Ray cluster went away mid-run (its head, its GCS, or this driver's node): the CLI exits 3.
    ``summary`` holds what finished before (outputs found written are counted as restored)."""

    def __init__(self, message: str, summary=None):
        super().__init__(message)
        self.summary = summary
