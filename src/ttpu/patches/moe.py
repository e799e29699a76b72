"""Static-shape replacements for MoE expert loops whose shapes depend on the routing.

Each replacement runs every expert on every token and weights the results by the
routing (zero for experts a token did not select): exact, with static shapes, at the cost
of the experts' FLOPs for all tokens.
"""

from __future__ import annotations

import types

import torch

from ttpu.patches.registry import Patch, forward_patch, instances_of, register

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
        transformers_versions=">=5.0,<5.25",  # 5.25 gave it transformers' experts implementations
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


def jetmoe_routing_counts_as_tensor(self: torch.nn.Module, hidden_states: torch.Tensor):
    """``JetMoeTopKGating.forward`` with each expert's token count kept a tensor (the
    original reads it back with ``.tolist()`` to split the tokens)."""
    logits = self.layer(hidden_states).float()
    top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
    chosen = torch.zeros_like(logits).scatter(1, top_k_indices, 1)
    expert_size = chosen.long().sum(0)
    _, index_sorted_experts = top_k_indices.flatten().sort(0)
    batch_index = index_sorted_experts.div(self.top_k, rounding_mode="trunc")
    batch_gates = top_k_gates.flatten()[index_sorted_experts]
    return index_sorted_experts, batch_index, batch_gates, expert_size, logits


def dense_jetmoe_parallel_experts(
    self: torch.nn.Module, inputs: torch.Tensor, expert_size: torch.Tensor | list[int]
) -> torch.Tensor:
    """``JetMoeParallelExperts.forward``: ``inputs`` rows come grouped by expert, in
    expert order, ``expert_size`` rows each; every expert runs on every row and each row
    keeps its own expert's output."""
    ends = torch.as_tensor(expert_size, device=inputs.device).cumsum(0)
    rows = torch.arange(inputs.shape[0], device=inputs.device)
    expert = (rows[:, None] >= ends[None, :]).sum(1)
    every = torch.einsum("ti,eoi->teo", inputs, self.weight)
    return every[rows, expert]


JETMOE = "transformers.models.jetmoe.modeling_jetmoe."


def _dense_jetmoe(module: torch.nn.Module) -> None:
    for instance in instances_of(module, JETMOE + "JetMoeTopKGating"):
        instance.forward = types.MethodType(jetmoe_routing_counts_as_tensor, instance)
    for instance in instances_of(module, JETMOE + "JetMoeParallelExperts"):
        instance.forward = types.MethodType(dense_jetmoe_parallel_experts, instance)


register(
    Patch(
        name="jetmoe.dense_experts",
        reason=(
            "JetMoeTopKGating reads the tokens per expert back to Python (.tolist()) for "
            "JetMoeParallelExperts to split them, so shapes depend on the routing; the counts "
            "stay a tensor and every expert runs on every token, each keeping its own expert's output"
        ),
        test="tests/test_patches.py::test_patched_model_matches_eager[jetmoe]",
        applies_to=lambda module: bool(instances_of(module, JETMOE + "JetMoeParallelExperts")),
        apply=_dense_jetmoe,
        transformers_versions=">=5.0,<6",
    )
)
