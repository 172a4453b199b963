"""FSDP2 (fully_shard) with 2 gloo processes on CPU: each rank's dot products and the full .grad (after
FSDP's reduce-scatter) equal the float64 torch.func reference of the unsharded model on the whole batch.
Cases: tied (GPT-2, Gemma) and untied (Llama, GPT-NeoX) embeddings, each with and without resharding after
forward, one and two micro-batches, parameters Shard(0) over both ranks (FSDP) or Replicate + Shard(0) on a
[2 replicas, 1 shard] mesh (HSDP); a step measured after detach() and attach() again; fully_shard also on the
leaf layers as accelerate's FSDP2 plugin applies it (embedding; final norm with the output layer and, tied, the
embedding), whose rules are recognised by running their forward (the probe must not run FSDP's hooks), and as
the app's --fsdp applies it (untied Llama: the embedding alone, the output layer alone); and
value="adamw" at the second AdamW step, against D of the optimizer's state gathered whole (each layer's D is
gathered in its backward)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4


@pytest.mark.parametrize("model,reshard,micro_batches,mesh", [
    ("gpt2", "reshard", 1, "fsdp"), ("llama", "keep", 2, "fsdp"), ("gemma-tied", "keep", 2, "fsdp"),
    ("gpt_neox-untied", "reshard", 1, "hsdp"), ("llama", "keep", 1, "fsdp-reattach"),
    ("gemma-tied", "reshard", 2, "fsdp-leaves"), ("gpt2", "reshard", 1, "fsdp-adamw"), ("llama", "reshard", 2, "fsdp-app")])
def test_fully_sharded_model_is_exact(model, reshard, micro_batches, mesh, tmp_path):
    out = str(tmp_path / "report.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "_fsdp_worker.py"), model, reshard, str(micro_batches), out,
                           *mesh.split("-")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    assert report["sharded"], "fully_shard left no DTensor parameter: the test would not test FSDP2"
    assert report["placements"] == ["(Shard(dim=0),)" if mesh.startswith("fsdp") else "(Replicate(), Shard(dim=0))"]
    if mesh.endswith("leaves"):  # Gemma: the scaled embedding and the (1 + weight) RMSNorm, recognised by probes
        assert report["sharded_leaves"] == ["lm_head", "model.embed_tokens", "model.norm"], report["sharded_leaves"]
    assert report["dots"] <= TOL
    assert max(report["grads"].values()) <= TOL, report["grads"]
