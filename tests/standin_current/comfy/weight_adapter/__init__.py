from .base import WeightAdapterBase

adapters = []
__all__ = ["WeightAdapterBase", "adapters"]
