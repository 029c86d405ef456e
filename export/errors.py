"""The export's user-facing errors: `edge-ssd export` prints their message as one line, exit 1."""


class ExportError(Exception):
    """A mistake the user can fix: a bad option, an unusable source, a destination not ours to replace."""
