"""The authors' ConceptPrune steps 2–4, transcribed literally (``neuron_receivers/wanda_receiver.py``,
``utils/base_utils.py``, ``wanda/wanda.py``, ``wanda/save_union_over_time.py``), for tests."""

from __future__ import annotations

import torch


class LiteralColumnNorm:
    """``ColumnNormCalculator``: norms grown as sqrt(old² + new²) over normalised rows."""

    def __init__(self):
        self.column_norms = None

    def add_rows(self, rows):
        if self.column_norms is None:
            self.column_norms = torch.norm(rows, dim=0)
        else:
            self.column_norms = torch.sqrt(self.column_norms ** 2 + torch.norm(rows, dim=0) ** 2)


def literal_record(batches):
    """The receiver's hook: ``out.view(-1, in)``, rows normalised (p=2, dim=1), added per (t, layer)."""
    norms = {}
    for t, layer, out in batches:
        save_gate = torch.nn.functional.normalize(out.clone().view(-1, out.shape[-1]), p=2, dim=1)
        norms.setdefault(t, {}).setdefault(layer, LiteralColumnNorm()).add_rows(save_gate)
    return {t: {l: c.column_norms for l, c in v.items()} for t, v in norms.items()}


def literal_masks(abs_weight, act_norms_base, act_norms_target, layer, timesteps, sparsity_ratio):
    """``wanda.py``'s loop for one layer, then ``save_union_over_time.py``'s union (select_ratio 0)."""
    union = torch.zeros_like(abs_weight)
    for t in range(timesteps):
        metric_base = abs_weight * act_norms_base[t][layer]
        metric_target = abs_weight * act_norms_target[t][layer]
        binary_mask_target = torch.zeros_like(abs_weight)
        _, sorted_idx_target = torch.sort(metric_target, dim=1, descending=True)
        pruned_indx_target = sorted_idx_target[:, :int(sparsity_ratio * metric_target.shape[1])]
        binary_mask_target.scatter_(1, pruned_indx_target, 1)
        diff = metric_target > metric_base
        union += (diff * binary_mask_target).float()
    return union > 0 * timesteps
