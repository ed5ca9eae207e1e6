"""Errors a user can cause. The CLI prints their message as one sentence, never a traceback."""


class CarsearchError(Exception):
    """A problem with the user's input or files, stated so that it says what to do."""


class ProvenanceMismatch(CarsearchError):
    """Two artifacts (or a run and its output folder) were made with different settings."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field
