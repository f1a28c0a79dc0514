"""Import-only torchvision stand-in for the engine contract tests (see tests/engine_stubs/README.md)."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision is a test stub here: {__name__}.{name} is not available")

    return unavailable
