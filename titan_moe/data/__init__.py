"""Training data sources: the streaming MDS loader and a synthetic source for tests/demos.

``titan_moe.data.config`` (the ``[data]`` section) is imported by the run
config module, so this package imports nothing heavy up front; the loader
(MosaicML streaming, which pulls in torchvision) loads on first use:

    from titan_moe.data import build_streaming_dataloader, build_streaming_validator
"""

_LAZY = {
    "build_streaming_dataloader": "titan_moe.data.loader",
    "StreamingTokenLoader": "titan_moe.data.loader",
    "build_streaming_validator": "titan_moe.data.validation",
    "build_validation_loaders": "titan_moe.data.validation",
    "StreamingValidator": "titan_moe.data.validation",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
