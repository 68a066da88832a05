"""Packing the first halves of linears that read one input (export/packing.py): the model computes
the same while packed, every pair keeps its ``up``, and the model is put back afterwards."""

from __future__ import annotations

import torch

from rankdown.checkpoint import load_model, open_checkpoint
from rankdown.export.packing import PACKED_CHILD, PackedMember, packable_groups, packed_first_halves
from rankdown.factor import FactorizedLinear


def test_packed_model_computes_the_same_and_is_restored(compressed_tiny):
    folder, _ = compressed_tiny["feature"]
    model = load_model(open_checkpoint(folder)).eval()
    groups = packable_groups(model)
    assert groups
    before = {id(parent): [getattr(parent, n) for n in names] for parent, names in groups}
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        with packed_first_halves(model) as packed:
            assert packed == len(groups)
            for parent, names in groups:
                members = [getattr(parent, n) for n in names]
                assert all(isinstance(m, PackedMember) for m in members)
                weight = getattr(parent, PACKED_CHILD).weight
                originals = before[id(parent)]
                widths = [(o.rank if isinstance(o, FactorizedLinear) else o.out_features) for o in originals]
                assert weight.shape == (sum(widths), originals[0].in_features)
                assert all(m.up is o.up for m, o in zip(members, originals) if isinstance(o, FactorizedLinear))
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for parent, names in groups:
        assert [getattr(parent, n) for n in names] == before[id(parent)] and not hasattr(parent, PACKED_CHILD)


def test_joint_groups_are_not_packed(compressed_tiny):
    """A shared down already runs once per input."""
    folder, _ = compressed_tiny["joint"]
    assert packable_groups(load_model(open_checkpoint(folder))) == []
