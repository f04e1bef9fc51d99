"""hvd.elastic on meshrun's restarts: a Horovod elastic script under
``meshrun -n 2 --max-restarts 1`` whose rank 1 dies once resumes at the last
commit and ends as an uninterrupted run does."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys

import pytest
from proctools import node0_port

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
state.register_reset_callbacks([lambda: resets.append(
    [hvd.elastic.restart_count(), state.epoch, state.batch, state.model.bias.item()])])
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
moved = []
if tries == 1:      # rank 0 on node 1's host, then on a host of none of the job's: refused
    import tempfile
    here, tempfile.tempdir = tempfile.gettempdir(), None
    for folder in (os.environ["NODE1_TMP"], os.path.join(here, "elsewhere")):
        if hvd.rank() == 0:
            os.makedirs(folder, exist_ok=True)
            tempfile.tempdir = folder
        try:
            train(state)
        except RuntimeError as e:
            moved.append(str(e))
        tempfile.tempdir = None
everyone = hvd.allgather_object([resets, moved])
if hvd.rank() == 0:
    print("RESULT " + json.dumps({"weights": weights, "epoch": state.epoch,
                                  "batch": state.batch, "seen": state.seen, "tries": tries,
                                  "resets": [r for r, _ in everyone], "first": first["at"],
                                  "moved": [m for _, m in everyone],
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
    ElasticSampler) as a job of two nodes on this host (``meshrun --nnodes
    2 -n 1 --max-restarts 1`` each, node 1's TMPDIR, so its job folder,
    another: as a host of its own without a shared disk), rank 1 (node 1)
    killing itself after the 2nd commit: the next try starts at that commit
    on both nodes (epoch 0, batch 2, the sampler's last 4 samples shared;
    the reset callbacks of both ranks see the commit's counters and weights:
    rank 0 broadcasts it), and the job ends 0 with the counters, the batches
    seen and the weights of an uninterrupted run (a plain ``meshrun -n 2``:
    no restarts, nothing written). Then that try's ``run`` again, rank 0's
    job folder made node 1's, then a new one (rank 0 moved to another host):
    RuntimeError on both ranks, naming where the commits are. Before,
    ``hvd.elastic.ElasticSampler`` raised NotImplementedError; before the
    broadcast, rank 1's callbacks saw its own start, and a moved rank 0
    started over from nothing."""
    pytest.importorskip("torch")
    tmp = str(tmp_path)
    script = os.path.join(tmp, "elastic_train.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    node_tmp = [os.path.join(tmp, f"node{i}") for i in (0, 1)]
    for folder in node_tmp:
        os.mkdir(folder)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NODE1_TMP=node_tmp[1])
    env.pop("MESH_SECRET", None)
    run = [sys.executable, "-m", "mesh.launch"]
    node = run + ["--nnodes", "2", "--master-addr", "127.0.0.1", "-n", "1", "--max-restarts",
                  "1", "--timeout", "100"]
    secret = dict(env, MESH_SECRET=secrets.token_hex(16))
    procs = []
    try:
        procs.append(subprocess.Popen(run + ["-n", "2", script, "live"], cwd=tmp, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        procs.append(subprocess.Popen(
            node + ["--node-rank", "0", "--master-port", "0", script, "die"], cwd=tmp,
            env=dict(secret, TMPDIR=node_tmp[0]), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
        port = node0_port(procs[1])
        procs.append(subprocess.Popen(
            node + ["--node-rank", "1", "--master-port", str(port), script, "die"], cwd=tmp,
            env=dict(secret, TMPDIR=node_tmp[1]), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out, err)
    plain, died = _result(outs[0][0]), _result(outs[1][0])
    assert "starting every rank again (restart 1 of 1" in outs[1][1], outs[1][1]
    assert died["tries"] == 1, died
    bias = died["resets"][0][0][3]
    assert died["resets"] == [[[1, 0, 2, bias]]] * 2, died     # the commit's, on both
    assert died["first"][:2] == [0, 2] and len(died["first"][2]) == 2, died
    assert plain["tries"] == 0 and plain["resets"] == [[], []] and plain["first"][:2] == [0, 0]
    assert plain["file"] is None and died["file"] is not None
    for folder in node_tmp:     # each node's job folder, removed as the job ended
        assert not os.path.exists(os.path.join(folder, os.path.basename(
            os.path.dirname(died["file"])))), os.listdir(folder)
    assert (died["epoch"], died["batch"]) == (plain["epoch"], plain["batch"]) == (2, 0)
    assert died["seen"] == plain["seen"] and len(plain["seen"]) == 6, (died, plain)
    assert all(sorted(sum(plain["seen"][e * 3:e * 3 + 3], [])) == list(range(12))
               for e in range(2))
    assert died["weights"] == plain["weights"], (died, plain)
    assert plain["moved"] == [[], []]
    for rank, errors in enumerate(died["moved"]):
        assert len(errors) == 2, died["moved"]
        for error in errors:
            assert error.startswith(f"hvd.elastic: rank {rank}: try 1 ("), error
            assert f"wrote them on host {socket.gethostname()} in {node_tmp[0]}" in error, error
            assert "the node of rank 0 changed between tries" in error, error


def test_torchrun_without_rdzv_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's run id without --rdzv-id is ``none`` on every such job: its
    commits' folder would be every such job's, so ``commit_file()`` (so
    ``run`` and ``commit``) refuses it, saying to give --rdzv-id. Before,
    the job used <tmp>/meshrun-job-<uid>-none."""
    pytest.importorskip("torch")
    from collectives.horovod import elastic
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ValueError, match="give torchrun --rdzv-id"):
        elastic.commit_file()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "myjob")
    assert os.path.basename(os.path.dirname(str(elastic.commit_file()))).endswith("-myjob")
