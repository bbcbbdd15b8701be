"""Library noise: what libraries log or warn that a user can neither act on nor silence."""

from __future__ import annotations

import logging
import warnings

# What libraries log that a user can neither act on nor silence: torchao's kernels built for GPUs this
# machine lacks, torch's deprecation notice about torchao registering its enums, the ONNX exporter's
# note that torchvision's operators (which no TissLM graph uses) are not registered, and MLflow's
# account of its own doings in the train and register stages.
LIBRARY_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
    "mlflow.system_metrics.system_metrics_monitor": (
        "Skip logging GPU metrics",
        "Started monitoring system metrics",
        "Stopping system metrics monitoring",
        "Successfully terminated system metrics monitoring",
    ),
    "mlflow.pyfunc": ("Validating input example against model signature",),
}
# What torch warns at run time about its own internals, as (category, message regex from the start):
# AOT autograd's cache asking torchao's Int8Tensor for a hash method (the quantize stage's compiled
# decode), the ONNX exporter calling its own deprecated LeafSpec, and the exporter noting that an
# axis name shared by several inputs is used once (the export stage).
LIBRARY_WARNINGS = (
    (UserWarning, r".* does not implement _stable_hash_for_caching"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: .* will not be used, since it shares the same shape constraints"),
)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_logs() -> None:
    """Drop the messages of LIBRARY_NOISE, by logger and message, and the warnings of
    LIBRARY_WARNINGS, and nothing else: the loggers stay as they are, other warnings still show, and
    configuring them imports nothing."""
    for name, fragments in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
