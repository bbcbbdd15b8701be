"""Library log noise: what libraries log at import that a user can neither act on nor silence."""

from __future__ import annotations

import logging

# What libraries log at import that a user can neither act on nor silence: torchao's kernels built
# for GPUs this machine lacks, and torch's deprecation notice about torchao registering its enums.
LIBRARY_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_logs() -> None:
    """Drop the import-time messages of LIBRARY_NOISE, by logger and message, and nothing else: the
    loggers stay as they are, and configuring them imports nothing."""
    for name, fragments in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
