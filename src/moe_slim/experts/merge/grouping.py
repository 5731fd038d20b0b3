"""Which experts merge together: REAM pseudo-groups, HC-SMoE average-linkage clusters, M-SMoE
dominants; within router groups for group-limited routers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import MoeSlimError

# -- grouping ----------------------------------------------------------------------------------


def group_ream(saliency: torch.Tensor, similarity: torch.Tensor, k: int, group_size: int) -> list[list[int]]:
    """REAM pseudo-grouping: the ``k`` most salient experts are centroids; in descending saliency each
    takes up to ``group_size - 1`` of its most similar unassigned experts. Groups: centroid first."""
    E = saliency.numel()
    order = sorted(range(E), key=lambda i: (-float(saliency[i]), i))
    centroids = order[:k]
    owner = [-1] * E
    for c in centroids:
        owner[c] = c
    members: dict[int, list[int]] = {c: [c] for c in centroids}
    for c in centroids:
        if all(o >= 0 for o in owner):
            break
        for j in sorted(range(E), key=lambda j: (-float(similarity[c, j]), j)):
            if len(members[c]) >= group_size:
                break
            if owner[j] < 0:
                owner[j] = c
                members[c].append(j)
    if any(o < 0 for o in owner):
        raise MoeSlimError(f"REAM groups of at most {group_size} experts around {k} centroids cannot hold "
                           f"{E} experts (raise --group-size to at least {-(-E // k)})")
    return [members[c] for c in sorted(centroids)]


def group_hc(mean_out: torch.Tensor, k: int) -> list[list[int]]:
    """HC-SMoE: average-linkage clustering (Euclidean) of the experts' mean outputs into exactly ``k``
    clusters; each cluster's representative is the member closest to the cluster's mean."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    E = mean_out.shape[0]
    if k >= E:
        return [[i] for i in range(E)]
    X = mean_out.double().cpu().numpy()
    labels = cut_tree(linkage(X, method="average", metric="euclidean"), n_clusters=k).reshape(-1)
    groups = []
    for lab in sorted(set(labels.tolist())):
        mem = [i for i in range(E) if labels[i] == lab]
        center = mean_out[mem].double().mean(0)
        dist = (mean_out[mem].double() - center).norm(dim=1)
        rep = mem[int(torch.argmin(dist))]  # ties: the lowest index
        groups.append([rep] + [m for m in mem if m != rep])
    return sorted(groups, key=lambda g: g[0])


def group_msmoe(frequency: torch.Tensor, logits: torch.Tensor, k: int) -> list[list[int]]:
    """M-SMoE: the ``k`` most frequently routed experts dominate; every other expert joins the dominant
    expert whose router-logit column (over the sample tokens) is most similar (cosine)."""
    E = frequency.numel()
    dominant = sorted(range(E), key=lambda i: (-float(frequency[i]), i))[:k]
    cols = torch.nn.functional.normalize(logits.float().T, dim=1)
    sim = cols @ cols.T
    members: dict[int, list[int]] = {d: [d] for d in dominant}
    for j in range(E):
        if j in members:
            continue
        best = max(dominant, key=lambda d: (float(sim[j, d]), -d))
        members[best].append(j)
    return [members[d] for d in sorted(dominant)]


def ream_similarity(gated_mean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """REAM's expert similarity in [0, 1]: the mean of (cos(gated mean outputs) + 1) / 2 and the
    router-logit similarity 1 - d / max d (d: Euclidean distance of row-normalised logit columns)."""
    m = torch.nn.functional.normalize(gated_mean.double(), dim=1)
    sim_out = (m @ m.T + 1) / 2
    cols = torch.nn.functional.normalize(logits.double().T, dim=1)
    d = torch.cdist(cols, cols)
    sim_gate = 1 - d / d.max().clamp_min(1e-12)
    return (sim_out + sim_gate) / 2


def _within_router_groups(n_experts: int, n_group: int, k: int, fn: Callable[[list[int], int], list[list[int]]]
                          ) -> list[list[int]]:
    """Run a grouping inside each router group (DeepSeek), ``k / n_group`` merged experts per group."""
    size, per = n_experts // n_group, k // n_group
    out: list[list[int]] = []
    for g in range(n_group):
        idx = list(range(g * size, (g + 1) * size))
        out += [[idx[i] for i in grp] for grp in fn(idx, per)]
    return out
