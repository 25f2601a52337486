"""ComfyUI nodes of the pack (imported only inside ComfyUI or with the test stand-in).

One module a method (``rece``...) plus ``files`` (save, load, export of every method's results);
each has its own ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``, gathered here.
"""

from . import conceptprune, fewshot, files, rece, task_vector

METHODS = (rece, conceptprune, fewshot, task_vector, files)

NODE_CLASS_MAPPINGS = {k: v for m in METHODS for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in METHODS for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
