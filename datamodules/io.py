"""Image reading and encoding for the data pipelines: re-exported from ditfuse.core.images (its home,
so that the core reads images without importing datamodules)."""

from ditfuse.core.images import (  # noqa: F401 - re-exports
    IMAGE_EXTS,
    ImageReadError,
    decode_image,
    encode_png,
    float01,
    read_image,
    to_raw_tensor,
    to_tensor,
    to_uint8,
    value_range,
)

__all__ = ["IMAGE_EXTS", "ImageReadError", "decode_image", "encode_png", "float01", "read_image", "to_raw_tensor",
           "to_tensor", "to_uint8", "value_range"]
