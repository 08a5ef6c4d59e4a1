"""One rank of the FSDP2 check (run by tests/test_fsdp.py under torchrun, gloo on the CPU).

Every rank trains a full copy of a tiny Llama on the whole batch (the single-process reference) and an FSDP2-sharded
copy on its half of the batch, with the task loss plus lambda * R, and records what each reports. Rank 0 writes
both records to the JSON file named by argv[1].
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_signlock import FlipTracker, SignReference, apply_gap_init, outward_drift
from hf_signlock.training.init_distribution import TargetWeight
from hf_signlock.training.sharding import all_reduce_sum

LAMBDA, MARGIN, STEPS = 300.0, 1.0, 6


def run(model, targets, batches, sharded):
    reference = SignReference.from_seed(targets, seed=5)
    tracker = FlipTracker(reference)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    record = {"loss": [], "drift": [], "flips": [], "near_zero": []}
    tracker.observe(0)
    for step, batch in enumerate(batches, start=1):
        loss = model(input_ids=batch, labels=batch).loss
        drift = outward_drift(reference, MARGIN)
        (loss + LAMBDA * drift).backward()
        optimizer.step()
        optimizer.zero_grad()
        if sharded:  # each rank saw half of the batch and holds its rows' share of R
            loss = all_reduce_sum(loss.detach()) / dist.get_world_size()
            drift = all_reduce_sum(drift.detach())
        record["loss"].append(loss.item())
        record["drift"].append(drift.item())
        observed = tracker.observe(step)
        record["flips"].append(observed["flips"])
        record["near_zero"].append(observed["near_zero_fraction"])
    record["histogram"] = tracker.crossing_histogram()
    state = tracker.state_dict()  # gathered to whole tensors on every rank
    # A position-weighted checksum of each gathered tensor: equal sums mean equal values at equal positions.
    record["state_checksum"] = {k: (v.long().reshape(-1) * torch.arange(v.numel())).sum().item() for k, v in state.items()}
    record["state_shapes"] = {k: list(v.shape) for k, v in state.items()}
    record["local_shapes"] = {t.name: list(reference.signs(t).shape) for t in targets}
    # A tracker restored from the whole-tensor state (as a resumed run does) continues exactly like this one.
    resumed = FlipTracker(reference)
    resumed.load_state_dict(state, tracker.last_step, tracker.last)
    loss = model(input_ids=batches[0], labels=batches[0]).loss
    (loss + LAMBDA * outward_drift(reference, MARGIN)).backward()
    optimizer.step()
    record["resumed_equal"] = resumed.observe(STEPS + 1) == tracker.observe(STEPS + 1) and \
        resumed.crossing_histogram() == tracker.crossing_histogram()
    return record


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # 65 rows of gate/up and 3 heads of 14 (42 rows) split unevenly over 2 ranks: 33 + 32, 21 + 21; the token
    # embedding and the untied head (97 rows: 49 + 48) are targets too, sharded by the root's fully_shard
    config = LlamaConfig(hidden_size=42, intermediate_size=65, num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, vocab_size=97)
    model = AutoModelForCausalLM.from_config(config)
    targets = apply_gap_init(model, seed=5, gap=0.5, embeddings=True)
    shard_model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (4, 16), generator=generator) for _ in range(STEPS)]

    whole = run(model, targets, batches, sharded=False)

    mesh = init_device_mesh("cpu", (world,))
    for layer in shard_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(shard_model, mesh=mesh)
    shard_targets = [TargetWeight(t.name, shard_model.get_submodule(t.name.rsplit(".", 1)[0]), t.init) for t in targets]
    half = 4 // world
    sharded = run(shard_model, shard_targets, [b[rank * half : (rank + 1) * half] for b in batches], sharded=True)
    if rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump({"whole": whole, "sharded": sharded, "world": world}, handle)
    # Both ranks finish every collective before either tears gloo down: once, on CI, a rank that got here first
    # aborted in teardown ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
