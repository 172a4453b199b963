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


CASES = [("gpt2", "reshard", 1, "fsdp"), ("llama", "keep", 2, "fsdp"), ("gemma-tied", "keep", 2, "fsdp"),
         ("gpt_neox-untied", "reshard", 1, "hsdp"), ("llama", "keep", 1, "fsdp-reattach"),
         ("gemma-tied", "reshard", 2, "fsdp-leaves"), ("gpt2", "reshard", 1, "fsdp-adamw"),
         ("llama", "reshard", 2, "fsdp-app"), ("gpt2", "keep", 2, "fsdp-app-project"),
         ("llama", "reshard", 1, "hsdp-project")]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every case in one torchrun launch (a launch costs more than a case): {case: its report, or the output
    of a launch that failed}."""
    work = tmp_path_factory.mktemp("fsdp")
    outs = {case: str(work / f"report-{i}.json") for i, case in enumerate(CASES)}
    with open(work / "cases.json", "w") as f:
        json.dump([[model, reshard, micro_batches, outs[case], *mesh.split("-")]
                   for case, (model, reshard, micro_batches, mesh) in zip(CASES, CASES)], f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "_fsdp_worker.py"), str(work / "cases.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    found = {}
    for case, path in outs.items():
        if os.path.exists(path):
            with open(path) as f:
                found[case] = json.load(f)
        else:
            found[case] = f"no report (exit {done.returncode}): " + done.stdout[-3000:] + done.stderr[-3000:]
    return found


@pytest.mark.parametrize("model,reshard,micro_batches,mesh", CASES)
def test_fully_sharded_model_is_exact(model, reshard, micro_batches, mesh, reports):
    report = reports[(model, reshard, micro_batches, mesh)]
    assert isinstance(report, dict), report
    assert report["sharded"], "fully_shard left no DTensor parameter: the test would not test FSDP2"
    assert report["placements"] == ["(Shard(dim=0),)" if mesh.startswith("fsdp") else "(Replicate(), Shard(dim=0))"]
    if mesh.endswith("leaves"):  # Gemma: the scaled embedding and the (1 + weight) RMSNorm, recognised by probes
        assert report["sharded_leaves"] == ["lm_head", "model.embed_tokens", "model.norm"], report["sharded_leaves"]
    if mesh.endswith("project"):  # projected per-sample gradients, each rank its rows (docs/ATTRIBUTION.md)
        assert report["projections"] <= TOL and report["val_projection"] <= TOL, report
    assert report["dots"] <= TOL
    assert max(report["grads"].values()) <= TOL, report["grads"]
