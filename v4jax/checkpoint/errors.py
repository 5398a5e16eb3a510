"""The one error type of checkpoint reading, conversion and export."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or written; the message names file and tensor."""
