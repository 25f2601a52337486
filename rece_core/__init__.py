"""rece_core: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024) in closed form.

Pure PyTorch; no ComfyUI import. Weights are ``name → [out, d]`` tensors (every ``attn2.to_k``
and ``attn2.to_v``), embeddings ``[tokens, d]`` text-encoder rows.
"""

from .derive import derive_embedding, derive_with_transform, gram, reach
from .edit import closed_form_edit, edit_transform
from .procedure import PRESETS, Erasure, Preset, RoundReport, TextEmbedding, erase_rows, rece
from .transform import LowRankTransform

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "Erasure", "LowRankTransform", "Preset", "RoundReport", "TextEmbedding",
    "closed_form_edit", "derive_embedding", "derive_with_transform", "edit_transform",
    "erase_rows", "gram", "reach", "rece",
]
