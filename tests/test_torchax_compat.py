"""The torchax 0.0.13 / torch 2.13 import fix is gated, scoped, and turns itself off."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from ttpu.backends.jax import torchax_compat


def test_torchax_imports_and_runs_an_op() -> None:
    torchax = torchax_compat.import_torchax()
    env = torchax.default_env()
    with env:
        x = torch.ones(3, device="jax")
        assert float((x * 2).sum().cpu()) == 6.0


def test_placeholder_is_scoped_to_the_import() -> None:
    with torchax_compat.tolerate_missing_named_overloads():
        placeholder = torch.ops.aten.prod.no_such_Dimname
    assert isinstance(placeholder, torchax_compat.MissingOverload)
    with pytest.raises(AttributeError):
        torch.ops.aten.prod.no_such_Dimname  # noqa: B018


def test_only_named_overloads_get_placeholders() -> None:
    with torchax_compat.tolerate_missing_named_overloads(), pytest.raises(AttributeError):
        torch.ops.aten.prod.not_a_real_overload  # noqa: B018


@pytest.mark.parametrize(
    ("torchax_version", "torch_lacks", "expected"),
    [("0.0.13", True, True), ("0.0.14", True, False), ("0.0.13", False, False)],
)
def test_fix_is_version_gated(monkeypatch, torchax_version, torch_lacks, expected) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: torchax_version)
    monkeypatch.setattr(torchax_compat, "torch_lacks_named_overloads", lambda: torch_lacks)
    assert torchax_compat.needs_named_overload_fix() is expected


def test_installed_pair_needs_the_fix_exactly_when_torch_lacks_the_overloads() -> None:
    version = importlib.metadata.version("torchax")
    lacks = "dim_Dimname" not in torch.ops.aten.prod.overloads()
    expected = lacks and torchax_compat.Version(version) <= torchax_compat.LAST_BROKEN_TORCHAX
    assert torchax_compat.needs_named_overload_fix() is expected
