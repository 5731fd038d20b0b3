"""Neuron alignment before averaging: a Hungarian assignment (``scipy.optimize.linear_sum_assignment``)
over activation and weight similarity (REAM) or weights alone (weight matching, M-SMoE).
"""

from __future__ import annotations

import torch

# -- merging ------------------------------------------------------------------------------------


def align(cost: torch.Tensor) -> torch.Tensor:
    """The neuron order of the member that minimises ``sum cost[a, perm[a]]`` (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def ream_cost(act_c: torch.Tensor, act_m: torch.Tensor, w_c: torch.Tensor, w_m: torch.Tensor) -> torch.Tensor:
    """REAM alignment cost: distances of normalised activation columns plus of normalised weight rows."""
    a_c = torch.nn.functional.normalize(act_c.float().T, dim=1)
    a_m = torch.nn.functional.normalize(act_m.float().T, dim=1)
    w_c = torch.nn.functional.normalize(w_c.float(), dim=1)
    w_m = torch.nn.functional.normalize(w_m.float(), dim=1)
    return torch.cdist(a_c, a_m) + torch.cdist(w_c, w_m)


def weight_matching_cost(w_c: torch.Tensor, w_m: torch.Tensor) -> torch.Tensor:
    """Weight matching (M-SMoE, Git Re-Basin): maximise the inner products of matched neurons."""
    return -(w_c.float() @ w_m.float().T)
