"""Current ``comfy.weight_adapter.lora``: the 0.3.64 stand-in's LoRAAdapter on this host's adapter base."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_rece_standin_0364_lora_adapter",
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "standin", "comfy", "weight_adapter", "lora.py"))
_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_old)
LoRAAdapter = _old.LoRAAdapter
