"""Import-only torchvision stand-in (see tests/engine_stubs/README.md)."""

from torchvision import stub_getattr

__getattr__ = stub_getattr(__name__)
