"""Static-shape replacements for MoE expert loops whose shapes depend on the routing."""

from __future__ import annotations

import types

import torch

from ttpu.patches.registry import Patch, instances_of, register


def dense_longcat_flash_experts(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """``LongcatFlashExperts.forward`` without data-dependent shapes.

    Every routed expert runs on every token and the results are weighted by the routing
    (zero for unselected experts), which is exact; "zero experts" are identities.
    """
    routed = self.num_routed_experts
    routing = torch.zeros(
        hidden_states.shape[0], self.total_experts,
        dtype=top_k_weights.dtype, device=hidden_states.device,
    ).scatter_add(1, top_k_index, top_k_weights)
    out = hidden_states * routing[:, routed:].sum(-1, keepdim=True)
    if self.gate_up_proj is not None:
        gate, up = torch.einsum("td,efd->tef", hidden_states, self.gate_up_proj[:routed]).chunk(2, -1)
        expert_out = torch.einsum("tei,edi->ted", self.act_fn(gate) * up, self.down_proj)
        out = out + (expert_out * routing[:, :routed, None]).sum(1)
    return out.to(hidden_states.dtype)


def _use_dense_longcat_experts(module: torch.nn.Module) -> None:
    for experts in instances_of(module, LONGCAT_EXPERTS):
        experts.forward = types.MethodType(dense_longcat_flash_experts, experts)


LONGCAT_EXPERTS = "transformers.models.longcat_flash.modeling_longcat_flash.LongcatFlashExperts"

register(
    Patch(
        name="longcat_flash.dense_experts",
        reason="LongcatFlashExperts loops over the experts the routing hit (nonzero, .item()), "
        "so shapes depend on the data; replaced by an exact static-shape computation "
        "(every expert on every token, weighted by the routing)",
        test="tests/test_patches.py::test_longcat_flash_matches_eager",
        applies_to=lambda module: bool(instances_of(module, LONGCAT_EXPERTS)),
        apply=_use_dense_longcat_experts,
        transformers_versions=">=5.0,<6",
    )
)
