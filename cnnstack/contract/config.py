"""A model's ``config.pbtxt``: Triton's ``ModelConfig`` protobuf in text format, written and read
through the message itself (``protos/inference/model_config.proto``), never by hand.

Dims exclude the batch dimension. With ``label_filename`` (labels.txt beside config.pbtxt, one
class name a line), Triton's classification extension (``class_count``) answers
``score:index:label`` as our server does.
"""

from __future__ import annotations

from google.protobuf import json_format, text_format

from cnnstack.contract.model import INPUT_NAME, OUTPUT_NAMES
from protos.inference import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
PLATFORM = "onnxruntime_onnx"  # the only one served here
TENSOR_TYPE = mc.TYPE_FP32


class RepositoryError(ValueError):
    """A repository, model or version cannot be used as asked; the message names the file or name."""


def add_tensors(
    config: mc.ModelConfig,
    input_shape: tuple[int, int, int] | list[int],
    num_classes: int,
    outputs: tuple[str, ...] | list[str] = OUTPUT_NAMES,
    label_filename: str | None = None,
) -> mc.ModelConfig:
    """Declare the served graph's tensors where ``config`` declares none (a hand-written config may)."""
    if not config.input:
        config.input.add(name=INPUT_NAME, data_type=TENSOR_TYPE, dims=[int(d) for d in input_shape])
    if not config.output:
        for name in outputs:
            out = config.output.add(name=name, data_type=TENSOR_TYPE, dims=[int(num_classes)])
            if label_filename:
                out.label_filename = label_filename
    return config


def model_config(
    name: str,
    input_shape: tuple[int, int, int] | list[int],
    num_classes: int,
    max_batch_size: int,
    max_queue_delay_us: int,
    num_versions: int = 1,
    label_filename: str | None = LABELS_FILE,
) -> mc.ModelConfig:
    """The config cnn-export publishes: the graph's tensors, dynamic batching, the latest versions."""
    config = mc.ModelConfig(name=name, platform=PLATFORM, max_batch_size=int(max_batch_size))
    add_tensors(config, input_shape, num_classes, label_filename=label_filename)
    config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    config.version_policy.latest.num_versions = int(num_versions)
    return config


def render_config(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str, source: str = CONFIG_FILE) -> mc.ModelConfig:
    """config.pbtxt -> ModelConfig; fields this server does not know are skipped (Triton has many)."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise RepositoryError(f"{source}: not a valid ModelConfig in protobuf text format: {e}") from e
    return _checked(config, source)


def parse_config_json(text: str, source: str) -> mc.ModelConfig:
    """A ModelConfig in protobuf's JSON form (what a KServe v2 repository load's ``config``
    parameter carries), checked as config.pbtxt is."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise RepositoryError(f"{source}: not a valid ModelConfig in JSON: {e}") from e
    return _checked(config, source)


def _checked(config: mc.ModelConfig, source: str) -> mc.ModelConfig:
    if config.platform and config.platform != PLATFORM:
        raise RepositoryError(
            f"{source}: platform {config.platform!r} is not served here (only {PLATFORM!r})"
        )
    if config.max_batch_size < 0:
        raise RepositoryError(f"{source}: max_batch_size must be >= 0, got {config.max_batch_size}")
    return config
