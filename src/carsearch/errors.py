"""Errors a user can cause. The CLI prints their message as one sentence, never a traceback."""


class CarsearchError(Exception):
    """A problem with the user's input or files, stated so that it says what to do."""


class ProvenanceMismatch(CarsearchError):
    """Two artifacts (or a run and its output folder) were made with different settings."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def os_error_sentence(e: OSError) -> str:
    """What a user can do about an operating-system error, in one sentence naming the file."""
    import errno

    text = str(e)
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC or "No space left" in text or "errno = 28" in text:
        return (
            f"the disk is full: writing{where or ' a file'} failed; nothing finished was lost (every file is "
            "written whole or not at all): free some space and run the same command again to resume."
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"cannot use{where} ({e.strerror}): choose a folder you can write to (--out), or fix the "
            "file's permissions."
        )
    return f"{(e.filename or 'a file')}: {e.strerror or text}; check that it exists and is readable."
