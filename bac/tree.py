"""What a block returns, taken apart and put back together: one tensor, or a tuple/list of them.

Joint-attention modules return their image and context streams as a tuple, single-stream units return both
streams; the engine caches every tensor of such an output and hands back the same structure. Non-tensor
items (``None``) pass through unchanged. Shapes: B batch, D all of a sample's features flattened.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Tree = Any  # a tensor, or a (nested) tuple/list of tensors and other items


def leaves(tree: Tree) -> list:
    """Every item of ``tree`` in order (tensors and whatever else it holds), depth first."""
    if isinstance(tree, (tuple, list)):
        return [x for item in tree for x in leaves(item)]
    return [tree]


def tensors(tree: Tree) -> list[torch.Tensor]:
    return [x for x in leaves(tree) if isinstance(x, torch.Tensor)]


def tree_map(fn: Callable, tree: Tree, *others: Tree) -> Tree:
    """``fn`` on every tensor of ``tree`` (and the tensors at the same places in ``others``); the rest is kept."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, *others)
    if isinstance(tree, (tuple, list)):
        items = [tree_map(fn, t, *(o[i] for o in others)) for i, t in enumerate(tree)]
        return type(tree)(items) if type(tree) in (tuple, list) else type(tree)(*items)  # namedtuples too
    return tree


def nbytes(tree: Tree) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(tree))


def detach_float_cpu(tree: Tree) -> torch.Tensor:
    """One feature tensor per sample for recording: a tensor as it is (float, on the CPU); several tensors with
    the same last dim as tokens side by side (B, T1 + T2 + ..., C); otherwise flattened side by side (B, D)."""
    ts = tensors(tree)
    if len(ts) == 1 and isinstance(tree, torch.Tensor):
        return tree.detach().float().cpu()
    B, C = ts[0].shape[0], ts[0].shape[-1]
    if all(t.dim() >= 2 and t.shape[0] == B and t.shape[-1] == C for t in ts):
        return torch.cat([t.detach().float().cpu().reshape(B, -1, C) for t in ts], dim=1)
    return flat(ts).detach().float().cpu()


def flat(tree: Tree) -> torch.Tensor:
    """All tensors of ``tree`` flattened per sample and concatenated, (B, D); dim 0 is the batch of each."""
    ts = tensors(tree)
    if len(ts) == 1:
        return ts[0].reshape(ts[0].shape[0], -1)
    return torch.cat([t.reshape(t.shape[0], -1).to(ts[0].dtype) for t in ts], dim=1)


def summed(trees: list[Tree]) -> torch.Tensor:
    """The residual of several blocks: their outputs added left to right when they are tensors of one shape
    (one residual stream), else each one flattened per sample and put side by side (several streams)."""
    first = trees[0]
    if all(isinstance(t, torch.Tensor) and t.shape == first.shape for t in trees):
        out = first
        for t in trees[1:]:
            out = out + t
        return out
    return torch.cat([flat(t) for t in trees], dim=1)


def map_tensors(fn: Callable, tree: Tree, seq: list) -> Tree:
    """``fn(t_j, seq[j])`` for the j-th tensor of ``tree`` (depth first); the structure and other items are kept."""
    it = iter(seq)
    return tree_map(lambda t: fn(t, next(it)), tree)
