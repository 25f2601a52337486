from .base import WeightAdapterBase
from .lora import LoRAAdapter

adapters = [LoRAAdapter]
__all__ = ["LoRAAdapter", "WeightAdapterBase", "adapters"]
