"""Import-only torchvision stand-in for the engine contract tests (see tests/engine_stubs/README.md)."""

__version__ = "0.0.0+stub"


def stub_getattr(module: str):
    """A module __getattr__ whose every attribute is a function that raises only if called."""

    def getattr_(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"torchvision is a test stub here: {module}.{name} is not available")

        return unavailable

    return getattr_


__getattr__ = stub_getattr(__name__)
