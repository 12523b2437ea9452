"""Independent brute-force references for the curvature tests: plain autograd,
Python loops over examples, terms and positions, index bookkeeping written from
the layer definitions (not from fprecond's layouts)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import fprecond as fp
from fprecond.tree import ravel

from tests.helpers import reference_reduction_factor, reference_term_losses


def param_offsets(md: fp.Model) -> dict[str, torch.Tensor]:
    """For each parameter, its flat positions in the dense layout, shaped like the parameter."""
    out, start = {}, 0
    for name, p in md.module.named_parameters():
        out[name] = torch.arange(start, start + p.numel()).reshape(p.shape)
        start += p.numel()
    return out


def layer_groups(md: fp.Model) -> list[torch.Tensor]:
    """Flat indices of each supported layer's parameters, and of each other parameter."""
    offsets = param_offsets(md)
    groups = []
    for layer in md.layers:
        groups.append(torch.cat([offsets[n].reshape(-1) for n in layer.param_names]))
    groups += [offsets[name].reshape(-1) for name in md.unsupported]
    return groups


def unit_groups(md: fp.Model) -> list[torch.Tensor]:
    """Flat indices of each output unit's incoming parameters, from the module definitions."""
    offsets = param_offsets(md)
    groups = []
    for layer in md.layers:
        module = layer.module
        weight = offsets[layer.weight] if layer.weight else None
        bias = offsets[layer.bias] if layer.bias else None
        if isinstance(module, nn.Embedding):
            groups += [weight[:, d] for d in range(weight.shape[1])]
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            count = (weight if weight is not None else bias).numel()
            for d in range(count):
                parts = [t.reshape(-1)[d:d + 1] for t in (weight, bias) if t is not None]
                groups.append(torch.cat(parts))
        else:  # Linear, Conv: output unit o owns weight[o] and bias[o]
            for o in range(weight.shape[0]):
                parts = [weight[o].reshape(-1)] + ([bias[o:o + 1]] if bias is not None else [])
                groups.append(torch.cat(parts))
    return groups


def block_mask(size: int, groups: list[torch.Tensor]) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    for group in groups:
        mask[group[:, None], group[None, :]] = True
    return mask


def dense_exact_fisher_ce(md: fp.Model, params, batch) -> torch.Tensor:
    """``R Σ_{n,t} Σ_c p_c ∇L_nt(c) ∇L_nt(c)ᵀ`` by enumerating classes (cross-entropy only)."""
    inputs, targets = batch
    flat, unravel = ravel(params)
    outputs = md.apply(params, inputs).detach()
    probs = torch.softmax(outputs, dim=-1)
    factor = reference_reduction_factor(md.loss, outputs)
    terms = [(n,) if outputs.dim() == 2 else (n, t) for n in range(outputs.shape[0])
             for t in range(1 if outputs.dim() == 2 else outputs.shape[1])]
    total = torch.zeros(flat.numel(), flat.numel())
    for term in terms:
        for c in range(outputs.shape[-1]):
            theta = flat.clone().requires_grad_(True)
            out = md.apply(unravel(theta), inputs)
            label = targets.clone()
            label[term] = c
            share = reference_term_losses(md.loss, out, label)[term] / factor
            (gradient,) = torch.autograd.grad(share, theta)
            total += factor * probs[term][c] * torch.outer(gradient, gradient)
    return total


def _layer_input_and_output(md: fp.Model, params, inputs, module: nn.Module):
    """Run the model with autograd, returning (outputs, layer input, layer output with retained grad)."""
    record = {}

    def hook(mod, args, output):
        record["input"] = args[0]
        output.retain_grad()
        record["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        leaf = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        outputs = md.apply(leaf, inputs)
    finally:
        handle.remove()
    return outputs, record["input"].detach(), record["output"]


def _positions_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(P, S)`` layer inputs of one example, bias coordinate appended (zero padding only)."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    elif isinstance(module, nn.Conv2d):
        assert module.padding_mode == "zeros" and module.groups == 1
        rows = F.unfold(x.unsqueeze(0), module.kernel_size, module.dilation, module.padding, module.stride)[0].T
    elif isinstance(module, nn.Embedding):
        rows = F.one_hot(x.reshape(-1), module.num_embeddings).to(torch.float64)
    else:
        raise NotImplementedError(type(module))
    if getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
    return rows


def _positions_grads(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """``(P, O)`` output gradients of one example."""
    if isinstance(module, nn.Conv2d):
        return grad.reshape(grad.shape[0], -1).T
    return grad.reshape(-1, grad.shape[-1])


def brute_force_kron(md: fp.Model, params, batch, layer_name: str, kind: str, approx: str):
    """Kronecker factors ``(A, G)`` by loops: one backward per example and per vector.

    ``kind``: ``"ggn"`` (backpropagate each column of each term's loss-Hessian square
    root, terms separately) or ``"empirical_fisher"`` (the example's loss gradient).
    """
    inputs, targets = batch
    module = md.module.get_submodule(layer_name)
    n_examples = targets.shape[0]
    outputs_all = md.apply(params, inputs).detach()
    factor = reference_reduction_factor(md.loss, outputs_all)
    a_sum, g_sum, count = 0.0, 0.0, 0
    for n in range(n_examples):
        x = inputs[n:n + 1]
        outputs, layer_in, layer_out = _layer_input_and_output(md, params, x, module)
        rows = _positions_inputs(module, layer_in[0])
        if approx == "expand":
            a_sum = a_sum + rows.T @ rows
            count += rows.shape[0]
        else:
            mean = rows.mean(0, keepdim=True)
            a_sum = a_sum + mean.T @ mean
            count += 1
        if kind == "ggn":
            # One vector per column of each loss term's Hessian square root (eigen-decomposed
            # here, independently of fprecond.losses), placed at that term's outputs.
            hessian = torch.autograd.functional.hessian(
                lambda f: reference_term_losses(md.loss, f, targets[n:n + 1]).sum() / factor, outputs.detach())
            hessian = hessian.reshape(outputs.numel(), outputs.numel())
            width = outputs.shape[-1]
            vectors = []
            for start in range(0, outputs.numel(), width):
                values, basis = torch.linalg.eigh(hessian[start:start + width, start:start + width])
                root = basis * values.clamp(min=0).sqrt()
                for c in range(width):
                    vector = torch.zeros(outputs.numel())
                    vector[start:start + width] = root[:, c]
                    vectors.append(vector.reshape(outputs.shape))
        else:
            share = reference_term_losses(md.loss, outputs, targets[n:n + 1]).sum() / factor
            vectors = [math.sqrt(factor) * torch.autograd.grad(share, outputs, retain_graph=True)[0]]
        for vector in vectors:
            (grad,) = torch.autograd.grad(outputs, layer_out, vector, retain_graph=True)
            cols = _positions_grads(module, grad[0])
            if approx == "expand":
                g_sum = g_sum + cols.T @ cols
            else:
                total = cols.sum(0, keepdim=True)
                g_sum = g_sum + total.T @ total
    return a_sum / count, g_sum
