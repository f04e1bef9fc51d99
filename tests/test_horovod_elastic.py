"""hvd.elastic on meshrun's restarts: a Horovod elastic script under
``meshrun -n 2 --max-restarts 1`` whose rank 1 dies once resumes at the last
commit and ends as an uninterrupted run does."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, os, sys
import torch
import collectives.horovod as hvd

hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
data = torch.arange(48, dtype=torch.float64).reshape(12, 4).float() / 10
target = data.sum(1, keepdim=True)
sampler = hvd.elastic.ElasticSampler(list(range(12)), shuffle=True, seed=1)
state = hvd.elastic.TorchState(model, opt, sampler=sampler, epoch=0, batch=0, seen=[])
resets = []
state.register_reset_callbacks([lambda: resets.append(hvd.elastic.restart_count())])
tries = hvd.elastic.restart_count()
first = {}


@hvd.elastic.run
def train(state):
    first.setdefault("at", [state.epoch, state.batch, list(state.sampler)])
    while state.epoch < 2:
        idx = list(state.sampler)
        for k in range(0, len(idx), 2):
            b = idx[k:k + 2]
            opt.zero_grad()
            ((state.model(data[b]) - target[b]) ** 2).mean().backward()
            opt.step()
            state.seen.append(sorted(sum(hvd.allgather_object(b), [])))
            state.sampler.record_batch(k // 2, 2)
            state.batch += 1
            state.commit()
            if sys.argv[1] == "die" and hvd.rank() == 1 and tries == 0 and state.batch == 2:
                os._exit(3)         # once, after the 2nd commit
        state.epoch += 1
        state.batch = 0
        state.sampler.set_epoch(state.epoch)
        state.commit()
    return [p.detach().tolist() for p in state.model.parameters()]


weights = train(state)
if hvd.rank() == 0:
    print("RESULT " + json.dumps({"weights": weights, "epoch": state.epoch,
                                  "batch": state.batch, "seen": state.seen, "tries": tries,
                                  "resets": resets, "first": first["at"],
                                  "file": hvd.elastic.commit_file()}), flush=True)
hvd.shutdown()
'''


def _result(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if "RESULT " in ln]
    assert len(lines) == 1, out
    return json.loads(lines[0].split("RESULT ", 1)[1])


@pytest.mark.timeout(150)
def test_hvd_elastic_run_resumes_at_the_last_commit_after_a_restart(tmp_path: object) -> None:
    """Horovod's elastic script (TorchState, commit, reset callbacks,
    ElasticSampler) under ``meshrun -n 2 --max-restarts 1``, rank 1 killing
    itself after the 2nd commit: the next try starts at that commit (epoch
    0, batch 2, the sampler's last 4 samples shared), and the job ends 0
    with the counters, the batches seen and the weights of an uninterrupted
    run (a plain ``meshrun -n 2``: no restarts, nothing written). Before,
    ``hvd.elastic.ElasticSampler`` raised NotImplementedError."""
    pytest.importorskip("torch")
    script = os.path.join(str(tmp_path), "elastic_train.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MESH_SECRET", None)
    run = [sys.executable, "-m", "mesh.launch", "-n", "2"]
    procs = [subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd in (run + ["--max-restarts", "1", script, "die"], run + [script, "live"])]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    died, plain = _result(outs[0]), _result(outs[1])
    assert "starting every rank again (restart 1 of 1" in outs[0], outs[0]
    assert died["tries"] == 1 and died["resets"] == [1], died
    assert died["first"][:2] == [0, 2] and len(died["first"][2]) == 2, died
    assert plain["tries"] == 0 and plain["resets"] == [] and plain["first"][:2] == [0, 0]
    assert plain["file"] is None and died["file"] is not None
    assert not os.path.exists(os.path.dirname(died["file"]))    # removed as the job ended
    assert (died["epoch"], died["batch"]) == (plain["epoch"], plain["batch"]) == (2, 0)
    assert died["seen"] == plain["seen"] and len(plain["seen"]) == 6, (died, plain)
    assert all(sorted(sum(plain["seen"][e * 3:e * 3 + 3], [])) == list(range(12))
               for e in range(2))
    assert died["weights"] == plain["weights"], (died, plain)
