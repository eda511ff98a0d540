"""Sample order is a pure function of (seed, epoch, world, rank, workers); packing keeps sequences apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from amid_pipeline.train.data import DataSettings, ShardBatches, count_batches, list_files


def epoch_ids(files, settings, world, rank, workers=1, epoch=0, heldout=False):
    data = ShardBatches(files, settings, seed=7, epoch=epoch, rank=rank, world=world, heldout=heldout)
    return [sid for w in range(workers) for batch in data.worker_batches(w, workers) for sid in batch.sample_ids]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (3, 1), (2, 2), (1, 3)])
def test_ranks_and_workers_partition_the_rows(tiny_shards, world, workers):
    files = list_files([str(tiny_shards)])
    settings = DataSettings(batch_size=3, heldout_fraction=0.2)
    everything = set(epoch_ids(files, settings, 1, 0)) | set(epoch_ids(files, settings, 1, 0, heldout=True))
    assert len(everything) == 48
    seen = [epoch_ids(files, settings, world, rank, workers) for rank in range(world)]
    flat = [sid for ids in seen for sid in ids]
    assert len(flat) == len(set(flat)), "a row was seen twice in one epoch"
    heldout = set(epoch_ids(files, settings, 1, 0, heldout=True))
    assert not set(flat) & heldout
    assert len(flat) >= len(everything - heldout) - world  # at most world - 1 rows dropped to balance ranks
    # every rank can take the counted number of batches
    counted = count_batches(files, settings, seed=7, epoch=0, world=world, workers=workers)
    for rank in range(world):
        data = ShardBatches(files, settings, seed=7, epoch=0, rank=rank, world=world)
        assert sum(1 for w in range(workers) for _ in data.worker_batches(w, workers)) >= counted


def test_order_is_reproducible_and_changes_with_the_epoch(tiny_shards):
    files = list_files([str(tiny_shards)])
    settings = DataSettings(batch_size=4)
    assert epoch_ids(files, settings, 1, 0) == epoch_ids(files, settings, 1, 0)
    assert epoch_ids(files, settings, 1, 0) != epoch_ids(files, settings, 1, 0, epoch=1)
    assert sorted(epoch_ids(files, settings, 1, 0)) == sorted(epoch_ids(files, settings, 1, 0, epoch=1))


def test_skip_resumes_mid_epoch(tiny_shards):
    files = list_files([str(tiny_shards)])
    settings = DataSettings(batch_size=4)
    full = [b.sample_ids for b in ShardBatches(files, settings, seed=1)]
    resumed = [b.sample_ids for b in ShardBatches(files, settings, seed=1, skip_batches=3)]
    assert resumed == full[3:]


def test_packed_mask_gives_every_padding_query_a_key(tiny_shards):
    """A query whose mask row is all False is a softmax over nothing: NaN in some SDPA kernels (GPU). A
    padding query of a packed batch sees itself only."""
    settings = DataSettings(batch_size=2, packing=True, max_length=400, packed_attention="mask")
    batches = list(ShardBatches(list_files([str(tiny_shards)]), settings, seed=0, shuffle=False))
    padded = [b for b in batches if b.tokens < b.inputs.input_ids.numel()]
    assert padded, "no batch with padding: the test shows nothing"
    for batch in padded:
        mask = batch.inputs.attention_mask[:, 0]
        assert mask.any(dim=-1).all()
        real = batch.inputs.attention_mask[:, 0].sum(-1) > 1  # padding queries see one key: themselves
        assert int((~real).sum()) >= batch.inputs.input_ids.numel() - batch.tokens


@pytest.mark.parametrize("packed_attention", ["mask", "position_ids"])
def test_packed_rows_attend_only_within_each_sequence(tiny_shards, tiny_models, packed_attention):
    """Hidden states of a packed row equal those of each sequence run alone, with the block-diagonal mask
    and with position ids alone (no mask)."""
    files = list_files([str(tiny_shards)])
    settings = DataSettings(batch_size=1, packing=True, max_length=400, packed_attention=packed_attention)
    packed = next(iter(ShardBatches(files, settings, seed=0, shuffle=False)))
    assert len(packed.sample_ids) > 1
    if packed_attention == "mask":
        assert packed.inputs.attention_mask.dim() == 4
    else:
        assert packed.inputs.attention_mask is None
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    with torch.no_grad():
        together = model.model(input_ids=packed.inputs.input_ids, attention_mask=packed.inputs.attention_mask,
                               position_ids=packed.inputs.position_ids, use_cache=False).last_hidden_state[0]
        starts = (packed.inputs.position_ids[0] == 0).nonzero()[:, 0].tolist() + [packed.inputs.input_ids.shape[1]]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = model.model(input_ids=packed.inputs.input_ids[:, a:b]).last_hidden_state[0]
            torch.testing.assert_close(together[a:b], alone, rtol=1e-4, atol=1e-5)
