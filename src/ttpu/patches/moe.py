"""Static-shape replacements for MoE expert loops whose shapes depend on the routing.

Each replacement runs every expert on every token and weights the results by the
routing (zero for experts a token did not select): exact, with static shapes, at the cost
of the experts' FLOPs for all tokens.
"""

from __future__ import annotations

import torch

from ttpu.patches.registry import forward_patch, register

DATA_DEPENDENT_LOOP = (
    "{} loops over the experts the routing hit (nonzero, torch.where), so its shapes "
    "depend on the data; replaced by an exact static-shape computation (every expert on "
    "every token, weighted by the routing)"
)


def dense_longcat_flash_experts(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """``LongcatFlashExperts.forward``; its "zero experts" are identities."""
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


def dense_switch_transformers_experts(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """``SwitchTransformersExperts.forward``: top-1 routing given as a one-hot mask."""
    weights = selected_experts[:, 0, :].to(routing_weights.dtype) * routing_weights
    out = torch.zeros_like(hidden_states)
    for index in range(self.num_experts):
        expert_out = self[f"expert_{index}"](hidden_states)
        out = out + (expert_out * weights[:, index, None]).to(hidden_states.dtype)
    return out


register(
    forward_patch(
        "longcat_flash.dense_experts",
        "transformers.models.longcat_flash.modeling_longcat_flash.LongcatFlashExperts",
        dense_longcat_flash_experts,
        reason=DATA_DEPENDENT_LOOP.format("LongcatFlashExperts"),
        test="tests/test_patches.py::test_patched_model_matches_eager[longcat_flash]",
        transformers_versions=">=5.0,<6",
    )
)
register(
    forward_patch(
        "switch_transformers.dense_experts",
        "transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersExperts",
        dense_switch_transformers_experts,
        reason=DATA_DEPENDENT_LOOP.format("SwitchTransformersExperts"),
        test="tests/test_patches.py::test_patched_model_matches_eager[switch_transformers]",
        transformers_versions=">=5.0,<6",
    )
)
