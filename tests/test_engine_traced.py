"""engine.sequential: a plain nn.Module's forward traced into layers, and
engine.distribute / engine.partition on such a model (nanoGPT's GPT as
written: a ModuleDict, a loop over a ModuleList, a tied head, its own loss)."""
import dataclasses
import functools
import os
import sys
import typing

import numpy as np
import pytest
from test_engine_distribute import _optim_close, trained_alike
from test_engine_tp_pipeline import interrupt_call

import collectives
import engine
import mesh

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import nanogpt_tp as nanogpt  # noqa: E402
from engine.torch_stage import TorchStage  # noqa: E402

CFG = nanogpt.GPTConfig(block_size=8, vocab_size=16, n_layer=3, n_head=2, n_embd=8)
STEPS, LR, ROWS = 3, 0.1, 4
PATIENT = {"MESH_HEARTBEAT_TIMEOUT": "60"}
# (DRY) a job whose prediction is not under test is given overhead=0.0: no dry runs
# of the executor's costs (engine.calibrate), a quarter of such a job's CPU; their
# stages only burn the measured times, whatever the model, and
# tests/test_engine_distribute.py runs them


def _trained(job, data, blind=False):
    """STEPS steps of ``job`` on ``data(step)``: its losses, whether this
    rank holds the last stage, and the gathered state (rank 0's). ``blind``:
    the inputs given to the first stage's ranks only (None elsewhere)."""
    opt = torch.optim.SGD(job.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = data(step)
        losses.append(job.step(None if blind and not job.pipeline.first else x, y))
        opt.step()
    state = job.state_dict()
    return {"losses": losses, "last": job.pipeline.last,
            "state": None if state is None else {k: v.numpy() for k, v in state.items()}}


def _gpt():
    torch.manual_seed(0)
    return nanogpt.GPT(CFG).double()


def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, CFG.vocab_size, (ROWS, CFG.block_size + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def test_gpt_traced_into_its_own_modules_and_loss():
    gpt = _gpt()
    seq = engine.sequential(gpt, target=True)
    assert seq.traced_from == "GPT"
    # the embeddings' sum (the dropout joins it), each block, the final norm, the head
    assert [sorted({n.rsplit(".", 1)[0] for n, _ in m.named_parameters()}) for m in seq] == [
        ["transformer.wpe", "transformer.wte"], ["transformer.h.0.attn.c_attn",
         "transformer.h.0.attn.c_proj", "transformer.h.0.ln_1", "transformer.h.0.ln_2",
         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"],
        *[[f"transformer.h.{i}.{m}" for m in ("attn.c_attn", "attn.c_proj", "ln_1", "ln_2",
                                               "mlp.c_fc", "mlp.c_proj")] for i in (1, 2)],
        ["transformer.ln_f"], ["lm_head"]]
    # the model's own parameters, the tie kept (the head's weight is the embedding's)
    assert seq[0].transformer.wte.weight is gpt.lm_head.weight is seq[-1].lm_head.weight
    x, y = _batch(0)
    torch.testing.assert_close(seq.loss(seq(x), y), gpt(x, y)[1], rtol=0, atol=0)
    # the layers end at the logits it returns (rows, positions, vocab), not at the
    # flattened view its loss reads: that view is the loss's (eval_step's outputs)
    torch.testing.assert_close(seq(x), gpt(x, y)[0], rtol=0, atol=0)
    # its assert on the input's length is traced as a check the pieces make
    with pytest.raises(AssertionError, match=r"assert at nanogpt_tp.py:\d+"):
        seq(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))
    # without the target: forward(idx) as written (its last position's logits)
    plain = engine.sequential(gpt)
    assert plain.loss is None
    torch.testing.assert_close(plain(x), gpt(x)[0], rtol=0, atol=0)


def test_partition_cuts_a_plain_module_by_its_traced_forward():
    gpt = _gpt()
    parts = engine.partition(gpt, 2, balance="parameters")
    assert sum(parts.counts) == 6 and all(isinstance(p, nn.Sequential) for p in parts)
    # the tie across the stages: the head's copy is the later stage's own
    assert [t.stages for t in parts.ties] == [(0, 1)]
    x = _batch(1)[0]
    torch.testing.assert_close(parts[1](parts[0](x)), gpt(x)[0], rtol=0, atol=0)
    # the cut as data: each stage's layers by the model's names, their parameters, the tie
    shown = str(parts).splitlines()
    assert shown[0] == "2 stages of 6 layers" and shown[-1] == (
        "  tied: transformer.wte.weight on stages 0, 1 (kept equal)")     # (the model's name)
    assert shown[1:3] == [
        "  stage 0: layers 0-1  976 parameters  transformer.wte..transformer.drop, "
        "transformer.h.0",
        "  stage 1: layers 2-5  1,704 parameters  transformer.h.1, transformer.h.2, "
        "transformer.ln_f, lm_head"]


class _SeqBlock(nn.Module):          # a block holding an nn.Sequential: still one layer
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_SeqBlock() for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class _Nested(nn.Module):            # the blocks one module down, in an encoder
    def __init__(self):
        super().__init__()
        self.inp, self.enc, self.out = nn.Linear(2, 4), _Encoder(), nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.enc(self.inp(x))))


def test_blocks_are_found_inside_an_encoder_and_called_whole():
    model = _Nested()
    seq = engine.sequential(model)
    assert [[n for n, _ in m.named_children()] for m in seq] == [
        ["inp"], ["enc"], ["enc"], ["enc"], ["out"]]          # enc.blocks.0, .1, .2
    assert [sorted(dict(m.named_modules()))[-1] for m in seq[1:4]] == [
        "enc.blocks.0.mlp.2", "enc.blocks.1.mlp.2", "enc.blocks.2.mlp.2"]
    x = torch.randn(3, 2)
    torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cannot cut 5 layers \(_Nested.forward traced into 5 "
                                         r"by engine.sequential: a cut falls only where one "
                                         r"tensor is all.*into 6 stages"):
        engine.partition(model, 6)


class _ViT(nn.Module):               # parameters of the model's own, torch's encoder blocks
    def __init__(self, d=16, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0,
                                                                batch_first=True)
                                     for _ in range(depth)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(x[:, 0])


class _ResNet(nn.Module):            # nested Sequentials, blocks with a residual inside
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(_SeqBlock(), _SeqBlock())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.layer1(self.stem(x).permute(0, 2, 3, 1))
        return self.fc(x.mean((1, 2)))


def test_a_vit_and_a_resnet_as_written():
    for model, x, labels in [
            (_ViT().eval(), torch.randn(2, 3, 8, 8),
             ["patch", "cls", "pos", "blocks.0", "blocks.1", "head"]),
            (_ResNet(), torch.randn(2, 3, 4, 4),
             ["stem.0..stem.1", "layer1.0", "layer1.1", "fc"])]:
        parts = engine.partition(model, 2)
        assert list(parts.labels) == labels
        torch.testing.assert_close(parts[1](parts[0](x)), model(x), rtol=0, atol=0)


class _TorchStacks(nn.Module):       # torch's own encoder and decoder, sequence first
    def __init__(self, encoder=nn.TransformerEncoder, d=8):
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.enc = encoder(nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0), 2,
                           norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 2, 16, dropout=0.0), 2)
        self.head = nn.Linear(d, 11)

    def forward(self, ids):
        h = self.emb(ids).transpose(0, 1)
        t = ids.size(1)
        mask = torch.ones((t, t), dtype=torch.bool).triu(1)     # causal
        h = self.enc(h, mask=mask, is_causal=True, src_key_padding_mask=ids == 0)
        return self.head(self.dec(h, h, tgt_mask=mask).transpose(0, 1))


class _Seq2Seq(nn.Module):      # torch's nn.Transformer: its stacks a level down
    def __init__(self, d=8):
        super().__init__()
        self.src_emb, self.tgt_emb = nn.Embedding(11, d), nn.Embedding(11, d)
        self.tr = nn.Transformer(d, 2, 2, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 11)

    def forward(self, src, tgt, src_pad, labels=None):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1],
                                                                dtype=torch.float64)
        out = self.tr(self.src_emb(src), self.tgt_emb(tgt), tgt_mask=causal,
                      src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
        return F.cross_entropy(self.head(out).flatten(0, 1), labels.flatten())


def _seq2seq_data(step):
    g = torch.Generator().manual_seed(step)
    src, tgt = torch.randint(1, 11, (ROWS, 6), generator=g), torch.randint(1, 11, (ROWS, 5),
                                                                           generator=g)
    pad = torch.zeros(ROWS, 6, dtype=torch.bool)
    pad[0, -2:] = True
    return (src, tgt, pad), torch.randint(0, 11, (ROWS, 5), generator=g)


class _OwnEncoder(nn.TransformerEncoder):
    def forward(self, src, **kw):
        return super().forward(src, **kw)


def test_torchs_own_encoder_and_decoder_are_cut_into_their_layers():
    """Their forwards test the input's shape for inference's fast path,
    which torch.fx cannot trace: every model holding one was refused,
    naming the model's line that called it (no control flow there)."""
    torch.manual_seed(0)
    model = _TorchStacks().double()
    ids = torch.randint(0, 11, (3, 5))
    ids[0, -2:] = 0
    parts = engine.partition(model, 2)
    # the masks cross the cuts between steps of the layers' loops beside the activation
    assert list(engine.partition(model, 5).labels) == [
        "emb..enc.layers.0", "enc.layers.1", "enc.norm..dec.layers.0", "dec.layers.1", "head"]
    for mode in (True, False):
        for m in (model, *parts):
            m.train(mode)
        out = parts[1](parts[0](ids))
        torch.testing.assert_close(out, model(ids), rtol=0, atol=0)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0, msg=n)
    # nn.Transformer holds them in its encoder and decoder: it was called whole, one
    # layer ("it cannot fill pp=4 pipeline stages"); traced through, its shape checks
    # decided by the sample
    torch.manual_seed(0)
    seq2seq = _Seq2Seq().double()
    x, y = _seq2seq_data(0)
    seq = engine.sequential(seq2seq, target=True, inputs=3, sample=x)
    assert [p.__class__.__name__ for p in seq] == [
        "_Seq2Seq[src_emb..tr.encoder.layers.0]", "_Seq2Seq[tr.encoder.layers.1]",
        "_Seq2Seq[tr.encoder.norm..tr.decoder.layers.0]", "_Seq2Seq[tr.decoder.layers.1]",
        "_Seq2Seq[tr.decoder.norm]", "_Seq2Seq[head]"]
    torch.testing.assert_close(seq.loss(seq(x), y), seq2seq(*x, labels=y), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"at test_engine_traced.py:\d+: return super\(\)."
                                        r"forward\(src, \*\*kw\), inside torch's forward\(\) at "
                                        r"transformer.py:\d+: "):
        engine.sequential(_TorchStacks(_OwnEncoder))


class _Residual(nn.Sequential):       # a Sequential whose forward is not its members in order
    def __init__(self):
        super().__init__(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 1))

    def forward(self, x):
        h = x + self[2](self[1](self[0](x)))
        return self[3](h)


def test_a_sequential_with_a_forward_of_its_own_is_traced_not_listed():
    model = _Residual()
    parts = engine.partition(model, 2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(parts[1](parts[0](x)), model(x), rtol=0, atol=0)
    assert parts.counts == (1, 1)                # no cut inside the residual branch
    assert [sum(p.numel() for p in st.parameters()) for st in parts] == [24, 4]


class _Gated(nn.Module):            # a mask beside the input: its blocks read it
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x, mask=None):
        for m in self.layers:
            x = m(x) * mask
        return x


class _TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        h = self.a(x)
        return F.mse_loss(h, y), F.l1_loss(self.b(h), y)


class _Wide(nn.Module):              # a block's output and its input read after it
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        h = self.a(x)
        return F.mse_loss(self.b(h) + h, y) + F.mse_loss(h, y)


class _Labelled(nn.Module):          # Hugging Face's order: a mask before the labels
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 3)])

    def forward(self, x, mask=None, labels=None):
        for m in self.layers:
            x = m(x) if mask is None else m(x) * mask
        out = {"logits": x}
        if labels is not None:
            out["loss"] = F.cross_entropy(x, labels)
        return out


@dataclasses.dataclass
class _Output:                       # Hugging Face's ModelOutput: a dataclass
    logits: "torch.Tensor"
    loss: "torch.Tensor | None" = None


class _LabelledOutput(_Labelled):
    def forward(self, x, mask=None, labels=None):
        out = super().forward(x, mask, labels)
        return _Output(out["logits"], out.get("loss"))


class _Logits(typing.NamedTuple):     # a named tuple the forward returns its outputs in
    logits: "torch.Tensor"
    loss: "torch.Tensor | None" = None


class _LabelledPair(_Labelled):
    def forward(self, x, mask=None, labels=None):
        out = super().forward(x, mask, labels)
        return _Logits(out["logits"], out.get("loss"))


class _Shifted(nn.Module):     # Hugging Face's causal LM: the loss reads the logits shifted
    def __init__(self, pair=True):
        super().__init__()
        self.layers, self.pair = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 3)]), pair

    def forward(self, x, labels=None):
        for m in self.layers:
            x = m(x)
        logits = x * 2
        shifted = logits[:, :-1, :].contiguous()
        loss = nn.CrossEntropyLoss()(shifted.view(-1, shifted.size(-1)), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits} if self.pair else loss


def _as_output(forward):     # Hugging Face's @can_return_tuple: wrapper(self, *args, **kwargs)
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return _Output(**forward(self, *args, **kwargs))
    return wrapper


class _KwBlock(nn.Linear):
    def forward(self, x, scale=1.0, **kwargs):
        return super().forward(x) * scale


class _Decorated(nn.Module):      # Hugging Face's forwards: decorated, **kwargs passed on
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_KwBlock(4, 4), _KwBlock(4, 3)])

    @_as_output
    def forward(self, x, mask=None, labels=None, *, scale=2.0, **kwargs):
        for m in self.layers:
            x = m(x, scale=scale, **kwargs)
        return {"logits": x, "loss": None if labels is None else F.cross_entropy(x, labels)}


class _Kwargs(_Decorated):         # not decorated: its **kwargs alone
    forward = _Decorated.forward.__wrapped__


def test_the_target_is_found_by_its_name_and_a_dict_output_is_read():
    model = _Labelled()
    seq = engine.sequential(model, target=True)          # labels, not the mask
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(seq.loss(seq(x), y), model(x, labels=y)["loss"], rtol=0, atol=0)
    # a dataclass is read as a dict (its loss was taken for the output, and handed on whole)
    model = _LabelledOutput()
    seq = engine.sequential(model, target=True)
    torch.testing.assert_close(seq.loss(seq(x), y), model(x, labels=y).loss, rtol=0, atol=0)
    torch.testing.assert_close(engine.sequential(model)(x), model(x).logits, rtol=0, atol=0)
    # without the target, .returned gives what the forward returns around the layers'
    # output (a loss_fn written for the model reads it: engine.distribute)
    out = x[:, :3]
    got = engine.sequential(model).returned(out)
    assert type(got) is _Output and got.logits is out and got.loss is None
    assert engine.sequential(_Labelled()).returned(out) == {"logits": out}
    got = engine.sequential(_Returned()).returned(out)    # (fx took it for a plain dict)
    assert type(got) is _ModelOutput and got.logits is out and dict(got) == {"logits": out}
    # a named tuple likewise (fx records a call of its class: it was taken for the output
    # tensor, and the step failed on the tuple)
    model = _LabelledPair()
    seq = engine.sequential(model, target=True)
    torch.testing.assert_close(seq.loss(seq(x), y), model(x, labels=y).loss, rtol=0, atol=0)
    torch.testing.assert_close(engine.sequential(model)(x), model(x).logits, rtol=0, atol=0)
    got = engine.sequential(model).returned(out)
    assert type(got) is _Logits and got.logits is out and got.loss is None
    # a decorated forward (fx failed: "code: co_varnames is too small") or one with
    # **kwargs ("Proxy object cannot be iterated"): traced, its decorator as it runs
    for wrapped in (_Decorated(), _Kwargs()):
        seq = engine.sequential(wrapped, target=True)
        want = wrapped(x, labels=y)
        want = want.loss if isinstance(want, _Output) else want["loss"]
        torch.testing.assert_close(seq.loss(seq(x), y), want, rtol=0, atol=0)
    assert type(engine.sequential(_Decorated()).returned(out)) is _Output
    assert engine.sequential(_PositionIds(True)).returned is None    # the tensor itself
    assert engine.sequential(_Labelled(), target=True).returned is None
    # the layers end at the logits the forward returns, though its loss reads them shifted
    # and flattened; a forward returning the loss alone: at what the loss's view reshapes
    ids, t = torch.randn(2, 5, 4), torch.tensor([[0, 2, 1, 1, 0], [1, 1, 2, 0, 2]])
    for pair, want in [(True, (2, 5, 3)), (False, (2, 4, 3))]:
        shifted = _Shifted(pair)
        layers, got = engine.sequential(shifted, target=True), shifted(ids, t)
        assert layers(ids).shape == want, pair
        if pair:
            torch.testing.assert_close(layers(ids), got["logits"], rtol=0, atol=0)
        torch.testing.assert_close(layers.loss(layers(ids), t), got["loss"] if pair else got,
                                   rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"calls the model's modules"):
        engine.sequential(model, target="mask")
    with pytest.raises(TypeError, match=r"takes no target 'label' to trace"):
        engine.sequential(model, target="label")


def test_what_cannot_be_traced_or_has_no_loss_is_named():
    with pytest.raises(TypeError, match=r"_Gated.forward: what it computes from 'mask' calls "
                                        r"the model's modules.*loss_fn="):
        engine.sequential(_Gated(), target=True)
    with pytest.raises(TypeError, match=r"_TwoOut.forward\(x, y\) returns 2 values computed "
                                        r"from 'y', not one loss"):
        engine.sequential(_TwoOut(), target=True)
    with pytest.raises(TypeError, match=r"_Wide.forward: its loss reads 2 values of the model"):
        engine.sequential(_Wide(), target=True)
    with pytest.raises(TypeError, match=r"parameter 'y' has no default"):
        engine.sequential(_Wide())
    # traced without its target, the mask keeps its default: the layers run unmasked
    seq = engine.sequential(_Gated())
    assert len(seq) == 2


def _ignored(step):
    """``_batch(step)`` with targets nanoGPT's loss ignores (-1), unevenly:
    each row (a micro-batch of 2, a dp replica's of 1) counts another
    number of tokens (2, 8, 5, 7 of 8, turning with the step)."""
    x, y = _batch(step)
    for r in range(ROWS):
        y[r, :(6, 0, 3, 1)[(r + step) % ROWS]] = -1
    return x, y


def _trained_here(data=_batch):
    """The GPT trained in this process on the whole batches: it, and its losses."""
    gpt = _gpt()
    opt = torch.optim.SGD(gpt.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        _, loss = gpt(*data(step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return gpt, losses


def _gpt_worker(world, axes, recompute=False):
    torch.set_num_threads(1)
    grid = mesh.grid(world, **axes)
    d, dp = grid.coord("dp") if "dp" in axes else 0, axes.get("dp", 1)
    job = engine.distribute(_gpt(), grid, schedule="1f1b", microbatches=2,
                            balance="parameters", timeout=60,     # no loss_fn: the GPT's own
                            recompute=recompute)
    opt = torch.optim.SGD(job.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = (t[d * ROWS // dp:(d + 1) * ROWS // dp] for t in _ignored(step))
        opt.zero_grad()
        losses.append(job.step(x, y))
        opt.step()
    state = job.state_dict()
    return {"losses": losses, "last": job.pipeline.last, "counts": job.counts,
            "state": None if state is None else {k: v.numpy() for k, v in state.items()}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("axes,recompute", [({"pp": 2}, False), ({"dp": 2, "pp": 2}, False),
                                            ({"pp": 2}, True),
                                            ({"pp": 2}, ["transformer.h.*.attn", "*.mlp.c_fc"])],
                         ids=["pp2", "dp2xpp2", "pp2-recompute", "pp2-selective"])
def test_gpt_distributed_as_written_trains_like_one_process(axes, recompute):
    """No layers list, no adapters, no loss_fn: the GPT's forward traced, its
    own loss the pipeline's; the tied embedding and head on two stages.
    With recompute, each stage's forward runs again in its backward; with
    names, the attentions and the MLPs' first layers only. Its targets
    ignored (-1) unevenly, its mean cross entropy runs as the per-token
    sum and count (each micro-batch's mean weighed by rows: losses 0.1-0.5%
    off, weights up to 9-32% of a tensor's largest entry)."""
    n = 2 * axes.get("dp", 1)
    results = mesh.spawn(_gpt_worker, n, axes, recompute, timeout=280, env=PATIENT)
    gpt, losses = _trained_here(_ignored)
    state = trained_alike(results, losses, gpt.state_dict())   # its keys, the tied pair both
    copy = nanogpt.GPT(CFG).double()
    copy.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x, y = _batch(9)
    torch.testing.assert_close(copy(x, y)[1], gpt(x, y)[1])


def test_selective_recompute_names_modules_the_steps_call():
    """distribute(recompute=names): a module the trace runs through (it holds
    the list of blocks) would never recompute, so it is refused, as a name
    that matches nothing; before anything is wrapped."""
    from engine.distribute import _checkpoint_model
    gpt = _gpt()
    with pytest.raises(ValueError, match=r"\['transformer'\] hold the model's list of layers"):
        _checkpoint_model(gpt, ["transformer", "*.attn"], traced=True)
    assert not getattr(gpt.transformer.h[0].attn, "_meshrun_checkpointed", False)
    with pytest.raises(ValueError, match="recompute='blocks' matches no submodule of GPT"):
        _checkpoint_model(gpt, ["blocks"], traced=True)
    _checkpoint_model(gpt, ["transformer.h.*"], traced=True)      # the blocks, called whole
    assert all(b._meshrun_checkpointed for b in gpt.transformer.h)
    x, y = _batch(0)
    torch.testing.assert_close(gpt(x, y)[1], _gpt()(x, y)[1], rtol=0, atol=0)


def test_the_prediction_times_a_cross_entropy_on_class_indices():
    """Job.retime times the last stage's loss on a stand-in target: a copy of
    the output where the loss takes one, else class indices of its leading
    axes (a language model's loss, the GPT's own as traced)."""
    from engine.job_retime import _loss_target
    from engine.torch_stage import torch_loss
    seq = engine.sequential(_gpt(), target=True)
    out = seq(_batch(0)[0]).detach()                      # (rows, positions, vocab)
    got = _loss_target(torch_loss(seq.loss), out)
    assert got.dtype == torch.long and got.shape == out.shape[:-1]
    y = torch.randn(4, 3)
    assert torch.equal(_loss_target(torch_loss(F.mse_loss), y), y)


def _meta_worker(world, axes, ckpt):
    torch.set_num_threads(1)
    grid = mesh.grid(world, **axes)
    with torch.device("meta"):                 # no rank holds the whole model's memory
        gpt = nanogpt.GPT(CFG).double()
    job = engine.distribute(gpt, grid, plan=nanogpt.PLAN if "tp" in axes else None,
                            sample=_batch(0)[0], microbatches=2, timeout=60, reps=1,
                            verbose=False,      # auto: the layers timed on real copies
                            overhead=0.0)       # (DRY)
    held = [p for p in gpt.parameters() if not p.is_meta]
    assert 0 < len(held) < len(list(gpt.parameters())), "a stage only, made real"
    assert all(not p.is_meta for p in job.parameters())
    job.load_state_dict(_gpt().state_dict())   # the trained model's weights, its own keys
    out = _trained(job, _batch)
    if out["state"] is not None:        # (rank 0's own tensors are its stage's, as torch's)
        out["state"] = {k: v.copy() for k, v in out["state"].items()}
    # an AdamW step more: its state whole on rank 0 (the tied embedding and head under
    # the embedding's name; with tp, vocab, colwise and fused colwise shards gathered),
    # and loaded back, each rank cutting its own shards: the state it had, bit for bit
    opt = torch.optim.AdamW(job.parameters(), lr=LR)
    opt.zero_grad()
    job.step(*_batch(STEPS))
    opt.step()
    out["optim"] = job.optimizer_state_dict(opt)
    if world.rank == 0:
        torch.save(out["optim"], f"{ckpt}/optim.pt")
    collectives.barrier(world)
    again = torch.optim.AdamW(job.parameters(), lr=LR)
    job.load_optimizer_state_dict(again, torch.load(f"{ckpt}/optim.pt"))
    mine, back = opt.state_dict(), again.state_dict()
    out["back"] = mine["param_groups"] == back["param_groups"] and all(
        torch.equal(v, back["state"][i][k]) for i, own in mine["state"].items()
        for k, v in own.items())
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("axes", [{"pp": 2}, {"pp": 2, "tp": 2}], ids=["pp2", "pp2xtp2"])
def test_a_model_on_the_meta_device_is_made_real_stage_by_stage(axes, tmp_path):
    """Each rank materializes only its own stages, with tp only its shards
    (the schedule chosen by timing real copies of the layers, one at a
    time); the state loaded after makes it train as one process from the
    same weights. Its AdamW state, gathered, is one process's (torch DCP's
    full optimizer state dict), and loads back."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    results = mesh.spawn(_meta_worker, 2 * axes.get("tp", 1), axes, str(tmp_path),
                         timeout=280, env=PATIENT)
    gpt, losses = _trained_here()
    trained_alike(results, losses, gpt.state_dict())
    opt = torch.optim.AdamW(gpt.parameters(), lr=LR)
    opt.zero_grad()
    gpt(*_batch(STEPS))[1].backward()
    opt.step()
    _optim_close(results[0]["optim"], get_optimizer_state_dict(
        gpt, opt, options=StateDictOptions(full_state_dict=True)), rtol=1e-8, atol=1e-12)
    assert "lm_head.weight" not in results[0]["optim"]["state"]     # (the embedding's)
    assert all(res["optim"] is None for res in results[1:])
    assert all(res["back"] for res in results)


def _load_tp_worker(world):
    torch.set_num_threads(1)
    grid = mesh.grid(world, pp=2, tp=2)
    # the head's logits left split over the vocabulary: the GPT's own cross entropy
    # runs on the shards (engine.tp_loss), as its per-token sum and count
    job = engine.distribute(_gpt(), grid, plan={**nanogpt.PLAN, "*lm_head": "colwise"},
                            schedule="1f1b", microbatches=2, balance="uniform", timeout=60,
                            verbose=False)
    torch.manual_seed(7)
    other = nanogpt.GPT(CFG).double()            # other weights, whole
    job.load_state_dict(other.state_dict())       # each rank its stages' shards
    state = job.state_dict()
    opt = torch.optim.SGD(job.parameters(), lr=LR)
    loss = job.step(*_ignored(3))
    opt.step()
    stepped = job.state_dict()
    return {"losses": [loss], "last": job.pipeline.last, "state": None if stepped is None
            else {k: v.numpy() for k, v in stepped.items()},
            "same": None if state is None else all(
                torch.equal(state[k], v) for k, v in other.state_dict().items())}


@pytest.mark.timeout(300)
def test_load_state_dict_cuts_each_tensor_parallel_ranks_shards():
    """The state loaded, each rank cuts its shards; then a step with the
    head's logits vocab-sharded and targets ignored unevenly: one
    process's loss and weights."""
    out = mesh.spawn(_load_tp_worker, 4, timeout=280, env=PATIENT)
    assert out[0]["same"] is True and all(o["same"] is None for o in out[1:])
    torch.manual_seed(7)
    other = nanogpt.GPT(CFG).double()
    opt = torch.optim.SGD(other.parameters(), lr=LR)
    want = other(*_ignored(3))[1]
    want.backward()
    opt.step()
    trained_alike(out, [want.item()], other.state_dict())


class _ReadsWeight(nn.Module):       # a head tied by reading the embedding's weight itself
    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(8, 4), nn.Linear(4, 4)

    def forward(self, ids, targets):
        logits = F.linear(torch.tanh(self.mix(self.embed(ids))), self.embed.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class _ReadsDtype(_ReadsWeight):      # its dtype only: what the shard tells as the whole
    def forward(self, ids, targets):
        h = self.embed(ids).to(self.embed.weight.dtype)
        return F.cross_entropy(self.mix(torch.tanh(h)).flatten(0, 1), targets.flatten())


def _reads_worker(world):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, 8, (4, 3), generator=g), torch.randint(0, 4, (4, 3),
                                                                           generator=g)
    out = {}
    for key, plan in [("vocab", {"embed": "vocab"}),
                      ("whole", {"mix": {"style": "colwise", "output": "replicate"}}),
                      ("dtype", {"embed": "vocab"})]:
        torch.manual_seed(0)
        model = (_ReadsDtype if key == "dtype" else _ReadsWeight)().double()
        try:
            job = engine.distribute(model, mesh.grid(world, pp=1, tp=2), plan=plan,
                                    schedule="1f1b", microbatches=2, balance="uniform",
                                    timeout=60, verbose=False)
            out[key] = job.step(ids, targets)
        except ValueError as e:
            out[key] = str(e)
    for key, kind in (("want", _ReadsWeight), ("want dtype", _ReadsDtype)):
        torch.manual_seed(0)
        out[key] = kind().double()(ids, targets).item()
    return out


@pytest.mark.timeout(120)
def test_a_forward_reading_a_sharded_weight_itself_is_refused():
    """A head tied as F.linear(h, self.embed.weight) beside a vocab-sharded
    embedding computed each tp rank's logits with its half of the table as
    if it were the whole: targets in the first half gave losses of 1.49
    and 2.03 on the two tp ranks where one process has 2.41, with no
    error. A plan leaving the embedding whole goes on, as does a forward
    reading only the sharded weight's dtype."""
    for out in mesh.spawn(_reads_worker, 2, timeout=100):
        assert "_ReadsWeight.forward reads embed.weight itself (not by calling embed), but " \
               "the plan shards embed (vocab)" in out["vocab"], out
        assert abs(out["whole"] - out["want"]) < 1e-12, out
        assert abs(out["dtype"] - out["want dtype"]) < 1e-12, out


class _MaskedBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(w, w)

    def forward(self, x, mask):
        return x + torch.tanh(self.fc(x)) * mask.unsqueeze(-1)


class _Masked(nn.Module):            # a mask made from the input, read by every block
    def __init__(self, w=6, vocab=7, blocks=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, w)
        self.blocks = nn.ModuleList(_MaskedBlock(w) for _ in range(blocks))
        self.head = nn.Linear(w, vocab)

    def forward(self, idx, targets):
        mask = idx != 0
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclasses.dataclass
class _ModelOutput(dict):    # Hugging Face's ModelOutput: a dict and a dataclass, its fields
    logits: "torch.Tensor | None" = None        # that are not None its items
    loss: "torch.Tensor | None" = None

    def __post_init__(self):
        self.update({k: v for k, v in vars(self).items() if v is not None})


class _Returned(_Masked):       # returns a ModelOutput without a loss: loss_fn reads .logits
    def forward(self, idx, labels=None):
        mask = idx != 0
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, mask)
        return _ModelOutput(logits=self.head(x))


def _logits_loss(out, y):       # a loss written for one process's model(x)
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


class _UNet(nn.Module):              # skips: each down's output read by an up, in reverse
    def __init__(self, w=6, depth=3):
        super().__init__()
        self.downs = nn.ModuleList(nn.Linear(w, w) for _ in range(depth))
        self.ups = nn.ModuleList(nn.Linear(2 * w, w) for _ in range(depth))

    def forward(self, x, y):
        skips = []
        for down in self.downs:
            x = torch.tanh(down(x))
            skips.append(x)
        for up in self.ups:
            x = torch.tanh(up(torch.cat([x, skips.pop()], -1)))
        return F.mse_loss(x, y)


class _HFBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.up, self.down = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, hidden, bias):
        return hidden + self.down(torch.tanh(self.up(hidden))) + bias


class _HF(nn.Module):                # Hugging Face's signature: the mask an input, a dict out
    def __init__(self, w=6, vocab=7, blocks=3):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, w)
        self.layer = nn.ModuleList(_HFBlock(w) for _ in range(blocks))
        self.classifier = nn.Linear(w, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embeddings(input_ids)
        bias = (1.0 - attention_mask[:, :, None].to(hidden.dtype)) * -0.5
        for block in self.layer:
            hidden = block(hidden, bias)
        out = {"logits": self.classifier(hidden)}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"].flatten(0, 1), labels.flatten())
        return out


class _Sized(_HF):     # transformers 5's GPT-2: a mask made or not by the lengths, the
    def forward(self, input_ids, labels=None):     # output's shape from the input's sizes
        hidden = self.embeddings(input_ids)
        q_length, kv_length = hidden.shape[1], input_ids.shape[-1]
        bias = 0.0 if q_length == kv_length else torch.zeros(q_length, kv_length).sum(-1)
        output_shape = (-1,) + input_ids.size()[1:] + (hidden.size(-1),)
        for block in self.layer:
            hidden = block(hidden, bias)
        logits = self.classifier(hidden.view(output_shape))
        # ForCausalLMLoss: the labels moved to the logits' device
        return F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device).flatten())


class _TupleLayer(nn.Module):     # Hugging Face's layers return a tuple the loop takes apart
    def __init__(self, w):
        super().__init__()
        self.dense = nn.Linear(w, w)

    def forward(self, hidden, bias, output_attentions=False):
        out = hidden + torch.tanh(self.dense(hidden)) + bias
        return (out, None) if output_attentions else (out,)


class _TupleEncoder(nn.Module):
    def __init__(self, w, blocks):
        super().__init__()
        self.layer = nn.ModuleList(_TupleLayer(w) for _ in range(blocks))

    def forward(self, hidden, bias):
        for layer in self.layer:
            layer_outputs = layer(hidden, bias)
            hidden = layer_outputs[0]
        return hidden


class _HFTuples(_HF):
    def __init__(self, w=6, vocab=7, blocks=3):
        super().__init__(w, vocab, blocks)
        self.layer = _TupleEncoder(w, blocks)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embeddings(input_ids)
        bias = (1.0 - attention_mask[:, :, None].to(hidden.dtype)) * -0.5
        logits = self.classifier(self.layer(hidden, bias))
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


class _Rotary(nn.Module):      # no parameters: Hugging Face's rotary embedding, (cos, sin)
    def __init__(self, w):
        super().__init__()
        self.register_buffer("inv_freq", 0.5 ** torch.arange(w), persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.dtype)
        return freqs.cos(), freqs.sin()


class _RotaryBlock(_HFBlock):
    def forward(self, hidden, bias, position_ids=None, position_embeddings=None):
        cos, sin = position_embeddings
        return super().forward(hidden * cos + hidden.flip(-1) * sin, bias)


class _Pair(nn.Module):
    def forward(self, x):
        return x, (x, x)


class _HFRotary(_HF):      # Llama's: the pair made once, passed whole to every layer, and
    # the position ids made from the length where none are given (torch.arange)
    def __init__(self, w=6, vocab=7, blocks=3):
        super().__init__(w, vocab, blocks)
        self.layer = nn.ModuleList(_RotaryBlock(w) for _ in range(blocks))
        self.rotary_emb = _Rotary(w)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embeddings(input_ids)
        bias = (1.0 - attention_mask[:, :, None].to(hidden.dtype)) * -0.5
        pos = torch.arange(input_ids.shape[1], device=hidden.device).unsqueeze(0)
        pe = self.rotary_emb(hidden, pos)
        for block in self.layer:
            hidden = block(hidden, bias, position_ids=pos, position_embeddings=pe)
        logits = self.classifier(hidden)
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def _skip_data(kind, step):
    g = torch.Generator().manual_seed(step)
    if kind == "hf":
        return ((torch.randint(0, 7, (ROWS, 5), generator=g),
                 torch.randint(0, 2, (ROWS, 5), generator=g)),
                torch.randint(0, 7, (ROWS, 5), generator=g))
    if kind in ("masked", "returned", "sized"):
        return (torch.randint(0, 7, (ROWS, 5), generator=g),
                torch.randint(0, 7, (ROWS, 5), generator=g))
    return (torch.randn(ROWS, 6, generator=g, dtype=torch.float64),
            torch.randn(ROWS, 6, generator=g, dtype=torch.float64))


def _skip_model(kind):
    torch.manual_seed(0)
    return {"masked": _Masked, "unet": _UNet, "hf": _HF, "returned": _Returned,
            "sized": _Sized}[kind]().double()


def test_a_mask_and_skips_cross_the_cuts_beside_the_activation():
    """After a block's call the live tensors cross a cut together, as a
    tuple: the mask every block reads, the skips a U-Net's ups read."""
    model = _skip_model("masked")
    seq = engine.sequential(model, target=True)
    assert [p.__class__.__name__ for p in seq] == [
        "_Masked[emb..blocks.0]", "_Masked[blocks.1]", "_Masked[blocks.2]",
        "_Masked[blocks.3]", "_Masked[head]"]
    x, y = _skip_data("masked", 0)
    mask, h = seq[0](x)                          # (the mask, then the activation: graph order)
    assert mask.dtype == torch.bool and h.shape == (ROWS, 5, 6)
    torch.testing.assert_close(seq.loss(seq(x), y), model(x, y)[1], rtol=0, atol=0)
    unet = _skip_model("unet")
    seq = engine.sequential(unet, target=True)
    assert len(seq) == 6
    x, y = _skip_data("unet", 0)
    torch.testing.assert_close(seq.loss(seq(x), y), unet(x, y), rtol=0, atol=0)
    out = x
    widths = []
    for piece in seq[:-1]:
        out = piece(out)
        widths.append(len(out) if isinstance(out, tuple) else 1)
    assert widths == [1, 2, 3, 3, 1]             # the skips still to be read


class DynamicCache:      # transformers' key-value cache, made by a forward with use_cache
    pass


class _CacheBlock(_HFBlock):
    def forward(self, hidden, bias, cache=None):
        return super().forward(hidden, bias)


class _Cached(_Sized):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(_CacheBlock(6) for _ in range(3))

    def forward(self, input_ids, labels=None):
        cache, hidden = DynamicCache(), self.embeddings(input_ids)
        for block in self.layer:
            hidden = block(hidden, 0.0, cache)
        return F.cross_entropy(self.classifier(hidden).flatten(0, 1), labels.flatten())


def test_branches_and_sizes_from_the_inputs_shapes_are_taken_from_the_sample():
    """An ``if`` on lengths (transformers 5's mask code: fx raised "symbolically
    traced variables cannot be used as inputs to control flow") is decided by
    the sample's shapes; a tuple made of sizes read after the layers (GPT-2's
    ``output_shape``: no cut between the layers, not being a tensor) is
    taken as the constant the sample gives; the loss reading the logits'
    device is one loss (it was taken for a second value of the model). A step
    whose inputs decide otherwise raises as it runs."""
    model = _skip_model("sized")
    x, y = _skip_data("sized", 0)
    with pytest.raises(TypeError, match=r"cannot be used as inputs to control flow"):
        engine.sequential(model, target=True)          # (no sample: nothing to decide by)
    seq = engine.sequential(model, target=True, sample=x)
    assert [p.__class__.__name__ for p in seq] == [
        "_Sized[embeddings..layer.0]", "_Sized[layer.1]", "_Sized[layer.2]",
        "_Sized[classifier]"]
    torch.testing.assert_close(seq.loss(seq(x), y), model(x, y), rtol=0, atol=0)
    torch.testing.assert_close(seq.loss(seq(x[:1]), y[:1]), model(x[:1], y[:1]), rtol=0,
                               atol=0)     # a micro-batch of fewer rows: the same sizes
    with pytest.raises(AssertionError, match=r"this step's inputs give another: give "
                                             r"engine.distribute a sample of their shapes"):
        seq(x[:, :4])
    with pytest.raises(TypeError, match=r"argument of type: .*DynamicCache.*\(transformers: "
                                        r"config.use_cache=False, as for training\)"):
        engine.sequential(_Cached(), target=True, sample=x)


def test_a_forward_of_several_inputs_takes_them_as_one_tuple():
    """forward(input_ids, attention_mask, labels): inputs=2 traces the mask
    too (partition: a sample tuple says so), the first piece takes both."""
    model = _skip_model("hf")
    (ids, mask), labels = _skip_data("hf", 0)
    seq = engine.sequential(model, target=True, inputs=2)
    assert len(seq) == 4 and list(seq[0].graph.nodes)[0].name == "xs"
    # a step given more inputs than were traced ran without the rest (position ids
    # dropped with no word); one tensor alone failed on an index
    for given, got in (((ids, mask, mask), "a tuple of 3"), (ids, "one Tensor")):
        with pytest.raises(TypeError, match=r"traced with 2 inputs \(input_ids, "
                                            rf"attention_mask; .*: got {got}"):
            seq[0](given)
    # traced with one input (no sample= tuple), a step given the tuple failed in the first
    # layer: "linear(): argument 'input' (position 1) must be Tensor, not tuple"
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x, mask=None):
            h = torch.tanh(self.a(x))
            return self.b(h if mask is None else h * mask)
    one = engine.sequential(Masked())
    with pytest.raises(TypeError, match=r"traced with 1 input \(x\), which each step "
                                        r"takes alone: got a tuple of 2; .* sample= a tuple"):
        one[0]((torch.ones(2, 4), torch.ones(2, 4)))
    torch.testing.assert_close(seq.loss(seq((ids, mask)), labels),
                               model(ids, mask, labels)["loss"], rtol=0, atol=0)
    parts = engine.partition(model, 2, balance="time", sample=(ids, mask))
    torch.testing.assert_close(parts[1](parts[0]((ids, mask))), model(ids, mask)["logits"],
                               rtol=0, atol=0)
    torch.manual_seed(0)
    tuples = _HFTuples().double()      # each layer's output a tuple, item 0 taken: cut there too
    seq = engine.sequential(tuples, target=True, inputs=2)
    assert [p.__class__.__name__ for p in seq] == [
        "_HFTuples[embeddings..layer.layer.0]", "_HFTuples[layer.layer.1]",
        "_HFTuples[layer.layer.2]", "_HFTuples[classifier]"]
    torch.testing.assert_close(seq.loss(seq((ids, mask)), labels),
                               tuples(ids, mask, labels)["loss"], rtol=0, atol=0)
    torch.manual_seed(0)
    rotary = _HFRotary().double()     # a module's (cos, sin) read by every layer: its items
    seq = engine.sequential(rotary, target=True, inputs=2)     # cross the cuts, each a part,
    # as do the position ids made by torch.arange (taken for no tensor: no cut between layers)
    assert [p.__class__.__name__ for p in seq] == [
        "_HFRotary[embeddings..layer.0]", "_HFRotary[layer.1]", "_HFRotary[layer.2]",
        "_HFRotary[classifier]"]
    x = (ids, mask)
    for piece in seq[:-1]:      # (the pair crossed as one part, which the next stage took
        x, _ = TorchStage(piece).forward(x)     # for a tensor: "'tuple' object has no
        assert all(isinstance(v, torch.Tensor) for v in x)      # attribute 'requires_grad'")
    torch.testing.assert_close(seq.loss(seq[-1](x), labels),
                               rotary(ids, mask, labels)["loss"], rtol=0, atol=0)
    nested = nn.Sequential(nn.Linear(2, 2), _Pair())      # a stage of one's own: told why
    with pytest.raises(TypeError, match=r"part 1 of its output \(a tuple\) is a tuple: a "):
        TorchStage(nested).forward(torch.ones(1, 2))
    with pytest.raises(TypeError, match=r"takes 2 input\(s\) besides its target 'labels', "
                                        r"not 3"):
        engine.sequential(model, target=True, inputs=3)
    with pytest.raises(TypeError, match=r"'attention_mask', 'labels' kept their default\(s\): "
                                        r"to trace a forward of several inputs, pass sample="):
        engine.sequential(model)
    with pytest.raises(ValueError, match=r"the parts of a tuple batch have \[3, 4\] rows"):
        engine.split_microbatches((ids, mask[:3]), 2)
    with pytest.raises(TypeError, match=r"a tuple of them .*not a dict \(input_ids, "):
        engine.split_microbatches({"input_ids": ids, "attention_mask": mask}, 2)   # model(**b)


def _skip_worker(world):
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match=r"recompute=3: True, False, 'auto' or submodule name"):
        engine.distribute(_skip_model("hf"), mesh.grid(world, pp=2), recompute=3)
    out = {}
    for kind, schedule in (("masked", "1f1b"), ("unet", "zb-v"), ("hf", "auto"),
                           ("returned", "1f1b"), ("sized", "1f1b")):
        job = engine.distribute(_skip_model(kind), mesh.grid(world, pp=2), schedule=schedule,
                                microbatches=2, timeout=60, verbose=False,
                                **({"sample": _skip_data(kind, 0)[0], "recompute": True,
                                    "overhead": 0.0}        # (DRY)
                                   if kind == "hf" else {"sample": _skip_data(kind, 0)[0],
                                                         "overhead": 0.0}
                                   if kind == "sized" else {"balance": "parameters"}),
                                **({"loss_fn": _logits_loss} if kind == "returned" else {}))
        out[kind] = _trained(job, lambda step, kind=kind: _skip_data(kind, step))
    return out


@pytest.mark.timeout(300)
def test_a_mask_and_skips_distributed_train_like_one_process():
    """Tuples between the stages, both ways: the mask (no gradient back) at
    1f1b, the U-Net's skips (gradients back to every down) at zb-v, whose
    split backward and V placement carry them too; a forward of two inputs
    (Hugging Face's ids and mask) chosen, timed and re-timed by "auto",
    its stages recomputing; a model returning Hugging Face's ModelOutput
    without a loss, its loss_fn reading ``out.logits`` as on one process
    (it was given the bare tensor: AttributeError on the last stage); a
    forward branching on lengths, traced by the sample (transformers 5's
    GPT-2: fx refused it)."""
    results = mesh.spawn(_skip_worker, 2, timeout=280, env=PATIENT)
    for kind in ("masked", "unet", "hf", "returned", "sized"):
        model = _skip_model(kind)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _skip_data(kind, step)
            loss = (model(*x, labels=y)["loss"] if kind == "hf" else
                    _logits_loss(model(x), y) if kind == "returned" else model(x, y))
            loss = loss[1] if isinstance(loss, tuple) else loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trained_alike([r[kind] for r in results], losses, model.state_dict())


def _seq2seq_worker(world):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    job = engine.distribute(_Seq2Seq().double(), mesh.grid(world, pp=2, tp=2),
                            plan={"*.linear1": "colwise", "*.linear2": "rowwise"},
                            schedule="1f1b", microbatches=2, balance="parameters",
                            sample=_seq2seq_data(0)[0], timeout=60, verbose=False, reps=1,
                            overhead=0.0)       # (DRY: no dry runs, the prediction aside)
    return _trained(job, _seq2seq_data)


@pytest.mark.timeout(300)
def test_torchs_transformer_sharded_by_a_plan_trains_like_one_process():
    """nn.Transformer's forward (src, tgt and a padding mask: a sample tuple)
    tests their sizes, decided by the sample; traced again once the plan
    sharded it, it was given the sample as one input ("symbolically traced
    variables cannot be used as inputs to control flow"). The encoder's
    output crosses the cuts to every decoder layer, its gradient back."""
    results = mesh.spawn(_seq2seq_worker, 4, timeout=280, env=PATIENT)
    torch.manual_seed(0)
    model = _Seq2Seq().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _seq2seq_data(step)
        loss = model(*x, labels=y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained_alike(results, losses, model.state_dict())


def _hf_tp_worker(world, recompute):
    torch.set_num_threads(1)
    job = engine.distribute(_skip_model("hf"), mesh.grid(world, pp=2, tp=2),
                            plan={"layer.*.up": "colwise", "layer.*.down": "rowwise"},
                            schedule="zb-h1", microbatches=2, balance="parameters",
                            sample=_skip_data("hf", 0)[0], timeout=60, verbose=False,
                            reps=1,     # (the sample is for the trace: timed once is enough)
                            overhead=0.0,       # (DRY)
                            recompute=recompute)  # tp collectives in the forward run again
    return _trained(job, lambda step: _skip_data("hf", step))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("recompute", [True, "layer.*"], ids=["stages", "blocks"])
def test_a_forward_of_two_inputs_sharded_by_a_plan_trains_like_one_process(recompute):
    """pp=2 x tp=2: (the mask's bias, the activation) cross the cut to
    tensor-parallel stages; the bias, made from the input, as a constant;
    the stages recompute, or their blocks (selective: the sharded blocks'
    forward collectives again in each I and W)."""
    results = mesh.spawn(_hf_tp_worker, 4, recompute, timeout=280, env=PATIENT)
    model = _skip_model("hf")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        (ids, mask), labels = _skip_data("hf", step)
        loss = model(ids, mask, labels)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained_alike(results, losses, model.state_dict())


class _CausalBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.qkv, self.fc, self.out = nn.Linear(w, 3 * w), nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).split(x.size(-1), dim=-1)
        x = x + (q @ k.transpose(-2, -1)).masked_fill(mask, float("-inf")).softmax(-1) @ v
        return x + self.out(torch.tanh(self.fc(x)))


class _Lengths(nn.Module):
    """A hand-written GPT-2 whose forward reads its input's length: position
    ids from ``idx.size(1)``, a causal mask made from T, a sliding window
    (Mistral's) where T is over 4, an ``if`` on the length, and the output's
    shape from the sizes read after the blocks (transformers' GPT-2)."""
    def __init__(self, w=6, vocab=7, blocks=3, positions=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, w), nn.Embedding(positions, w)
        self.h = nn.ModuleList(_CausalBlock(w) for _ in range(blocks))
        self.head = nn.Linear(w, vocab)

    def logits(self, idx):
        T = idx.size(1)
        mask = torch.ones((T, T), dtype=torch.bool, device=idx.device).triu(1)
        if T > 4:
            mask = mask | torch.ones((T, T), dtype=torch.bool, device=idx.device).tril(-4)
        x = self.wte(idx) + self.wpe(torch.arange(0, T, device=idx.device))
        output_shape = (-1,) + idx.size()[1:] + (x.size(-1),)
        for block in self.h:
            x = block(x, mask)
        return self.head(x.view(output_shape))

    def forward(self, idx, targets=None):
        return F.cross_entropy(self.logits(idx).flatten(0, 1), targets.flatten())


LENGTHS = (5, 3, 7)     # each step's sequence length (the sample's: the first)


def _length_data(step, length=None):
    g = torch.Generator().manual_seed(step)
    t = length or LENGTHS[step]
    return (torch.randint(0, 7, (ROWS, t), generator=g),
            torch.randint(0, 7, (ROWS, t), generator=g))


def _lengths_worker(world):
    torch.set_num_threads(1)
    out = {}
    for name, axes in (("pp2", {"dp": 2, "pp": 2}), ("tp2", {"dp": 2, "pp": 1, "tp": 2}),
                       ("pp2xtp2", {"pp": 2, "tp": 2}), ("pp2v", {"dp": 2, "pp": 2})):
        grid = mesh.grid(world, **axes)
        d, dp = grid.coord("dp") if "dp" in axes else 0, axes.get("dp", 1)

        def data(step, length=None, d=d, dp=dp):
            return tuple(t[d * ROWS // dp:(d + 1) * ROWS // dp]
                         for t in _length_data(step, length))
        torch.manual_seed(0)
        job = engine.distribute(_Lengths().double(), grid, microbatches=2,
                                schedule="interleaved" if name == "pp2v" else "1f1b",
                                balance="parameters", sample=data(0)[0], timeout=60,
                                plan={"h.*.fc": "colwise", "h.*.out": "rowwise"}
                                if "tp" in axes else None, reps=1, verbose=False, overhead=0.0,
                                recompute=name == "pp2xtp2")     # (each stage's forward again)
        held = job.parameters()
        # at pp=2, the later stage's ranks given no inputs: the first stage's tell the lengths
        blind = "pp" in name
        res = _trained(job, data, blind)
        # the optimizer's parameters are still the ones the stages train
        assert [id(p) for p in job.parameters()] == [id(p) for p in held]
        x, y = data(STEPS, 6)       # forward only, at another length
        res["eval"] = job.eval_step(None if blind and not job.pipeline.first else x, y)
        out[name] = res
    return out


@pytest.mark.timeout(300)
def test_steps_of_other_sequence_lengths_than_the_samples_train_like_one_process():
    """A forward reading its input's length (position ids, a causal mask and
    a sliding window made from T, an ``if`` on it, the output's shape) was
    traced at the sample's length, and a step of another raised
    AssertionError ("pad to the sample's"): the job traces the model again
    at each new length, cut alike, its stages keeping their parameters and
    shards; steps at 5, 3 and 7 tokens and an eval_step at 6 are one
    process's, at pp=2 (dp=2), tp=2 (dp=2), pp=2 x tp=2 (recomputing) and
    pp=2 interleaved (each rank two stages of the four, dp=2). At pp=2 the
    later stage's ranks are given no inputs (``step(None, y)``,
    ``eval_step(None, y)``): the first micro-batch's activations tell them
    the first stage's shapes (they raised ValueError at a new length). A
    Reshaped told none (no header came) still refuses other shapes there,
    naming them."""
    model = _Lengths().double()
    x, y = _length_data(1)
    seq = engine.sequential(model, target=True, sample=_length_data(0)[0])
    assert len(seq) == 4 and seq.shaped        # (cut between the blocks: the sizes baked)
    with pytest.raises(AssertionError, match=r"give engine.distribute a sample of their "
                                             r"shapes \(an engine.distribute job traces"):
        seq(x)
    reshaped = engine.traced.Reshaped(model, seq, list(range(len(seq))), seq.loss, True, 1,
                                      _length_data(0)[0])
    for length in (3, 7, 5, 3):
        x, y = _length_data(0, length)
        reshaped.at(x)
        torch.testing.assert_close(seq.loss(seq(x), y), model(x, y), rtol=0, atol=0)
    assert len(reshaped.forms) == 3     # (a length seen before: traced once)
    # a later stage given no inputs, told the shapes by the first (zeros of them traced)
    entry = _length_data(0)[0]
    first, seq = (engine.sequential(model, target=True, sample=entry) for _ in range(2))
    head = engine.traced.Reshaped(model, first, [0], None, True, 1, entry)
    reshaped = engine.traced.Reshaped(model, seq, [1, 2, 3], seq.loss, True, 1, entry,
                                      {1: first[0](entry)}, "rank 3")
    assert reshaped.told() == (((5,),), ("int64",))
    for length in (3, 7, 3):
        x, y = _length_data(0, length)
        head.step(x)
        reshaped.step(None)
        reshaped.follow(head.told())
        assert reshaped.told() == (((length,),), ("int64",))
        torch.testing.assert_close(seq.loss(seq[1:](first[0](x)), y), model(x, y),
                                   rtol=0, atol=0)
    assert len(reshaped.forms) == 3
    reshaped.step(None)     # none told: a new length refused, named
    head.step(_length_data(0, 4)[0])
    with pytest.raises(ValueError, match=r"rank 3: _Lengths\[h.1\] is given inputs of shapes "
                                         r"\[\(4,\), \(4, 6\)\] \(rows aside\), not "
                                         r"\[\(3,\), \(3, 6\)\] .* given no inputs"):
        seq[1:](first[0](_length_data(0, 4)[0]))
    results = mesh.spawn(_lengths_worker, 4, timeout=280, env=PATIENT)
    for name in ("pp2", "tp2", "pp2xtp2", "pp2v"):
        torch.manual_seed(0)
        model = _Lengths().double()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = model(*_length_data(step))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trained_alike([r[name] for r in results], losses, model.state_dict())
        with torch.no_grad():
            want = model(*_length_data(STEPS, 6)).item()
        for r in results:
            if r[name]["last"]:
                assert r[name]["eval"] == pytest.approx(want, rel=1e-10), name


class _LengthsLogits(_Lengths):
    forward = _Lengths.logits


def test_partition_traces_a_forward_reading_its_inputs_lengths_with_its_sample():
    """engine.partition traced a plain module without its ``sample=``: a
    forward with an ``if`` on its input's length (and sizes read across the
    blocks) could not be cut by hand (TypeError: fx's "symbolically traced
    variables cannot be used as inputs to control flow"). With it, the
    stages run the model at the sample's shapes; at other shapes they raise,
    called by hand (the trace holds what the sample's decided: a Pipeline
    of them, or engine.distribute, traces again)."""
    torch.manual_seed(0)
    model = _LengthsLogits().double()
    x = _length_data(0)[0]
    parts = engine.partition(model, 2, balance="parameters", sample=x)
    assert len(parts) == 2 and len(parts.labels) == 4
    out = x
    for stage in parts:
        out = stage(out)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    with pytest.raises(AssertionError, match=r"the traced forward took the branch at .* as the "
                                             r"sample's shapes decided it \(True\)"):
        parts[1](parts[0](_length_data(0, 3)[0]))


def _token_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _partition_lengths_worker(world):
    """Pipelines built by hand of engine.partition's stages (1F1B, a stage
    a rank; interleaved, two stages of four a rank), later ranks given no
    inputs: steps at LENGTHS, an eval_step at 6; each rank's parameters
    (by the model's names) and the last stage's losses."""
    torch.set_num_threads(1)
    grid, out = mesh.grid(world, pp=2), {}
    r = grid.coord("pp")
    for name, sched in (("1f1b", engine.schedules.one_f_one_b(2, 2)),
                        ("interleaved", engine.schedules.interleaved_1f1b(2, 2, 2))):
        torch.manual_seed(0)
        parts = engine.partition(_LengthsLogits().double(), sched.num_stages,
                                 balance="uniform", sample=_length_data(0)[0])
        pipe = engine.Pipeline(grid, engine.stages_for_rank(parts, sched, r), sched,
                               loss_fn=_token_loss, timeout=60)
        params = [p for st in pipe.stages.values() for p in st.module.parameters()]
        opt = torch.optim.SGD(params, lr=LR)
        losses = []
        for step in range(STEPS):
            x, y = _length_data(step)
            opt.zero_grad()
            losses.append(pipe.step(x if pipe.first else None, y))
            opt.step()
        x, y = _length_data(STEPS, 6)
        out[name] = {"losses": losses, "last": pipe.last,
                     "eval": pipe.eval_step(x if pipe.first else None, y),
                     "state": {k: v.tolist() for s in sched.stages_of(r)
                               for k, v in parts.named_parameters(s)}}
    return out


@pytest.mark.timeout(120)
def test_a_pipeline_of_partitions_stages_traces_again_at_other_sequence_lengths():
    """A Pipeline built by hand of engine.partition's stages of a forward
    that reads its input's length ran only at the sample's (a step at
    another raised the trace's AssertionError on the first stage's rank,
    MeshError on the other's): it traces the model again at each new
    length, as an engine.distribute job does, the later stage's rank given
    no inputs told the shapes by the first's. Steps at 5, 3 and 7 tokens and
    an eval_step at 6 are one process's (1F1B, and interleaved: a rank's
    two stages)."""
    torch.manual_seed(0)
    model = _LengthsLogits().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _length_data(step)
        loss = _token_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        want = _token_loss(model(_length_data(STEPS, 6)[0]), _length_data(STEPS, 6)[1])
    results = mesh.spawn(_partition_lengths_worker, 2, timeout=100, env=PATIENT)
    for name in ("1f1b", "interleaved"):
        got = {k: v for r in results for k, v in r[name]["state"].items()}
        assert sorted(got) == sorted(model.state_dict()), name
        for k, v in model.state_dict().items():
            torch.testing.assert_close(torch.tensor(got[k], dtype=v.dtype), v, msg=k)
        last = [r[name] for r in results if r[name]["last"]]
        assert len(last) == 1
        np.testing.assert_allclose(last[0]["losses"], losses, rtol=1e-10)
        assert last[0]["eval"] == pytest.approx(want.item(), rel=1e-10), name


def test_pipelines_of_one_partitions_stages_run_each_at_its_own_steps_lengths():
    """Two Pipelines of one partition's stages (one process, a rank of two
    stages) share the pieces: each step runs at its own inputs' length,
    whatever the other's last step moved the pieces to (one Reshaped, not
    one a Pipeline, each believing the pieces were where it had left them:
    the trace's AssertionError)."""
    class Solo:
        rank, size = 0, 1
    torch.manual_seed(0)
    model = _LengthsLogits().double()
    parts = engine.partition(model, 2, balance="uniform", sample=_length_data(0)[0])
    sched = engine.schedules.interleaved_1f1b(1, 2, 2)
    pipes = [engine.Pipeline(Solo(), list(parts), sched, loss_fn=_token_loss) for _ in "ab"]
    for pipe, length in zip(pipes * 2, (3, 5, 7, 3)):
        x, y = _length_data(1, length)
        with torch.no_grad():
            want = _token_loss(model(x), y).item()
        assert pipe.eval_step(x, y) == pytest.approx(want, rel=1e-12), length


def test_a_pipeline_keeps_the_graphs_of_a_bounded_number_of_lengths(monkeypatch):
    """Each new length's graphs were kept for good (a program of ever new
    lengths grew them without bound): at most FORMS lengths' now, the least
    lately used dropped (never the sample's), and a length dropped is traced
    again when it comes back, its loss still one process's."""
    from engine import traced_reshaped
    monkeypatch.setattr(traced_reshaped, "FORMS", 3)

    class Solo:
        rank, size = 0, 1
    torch.manual_seed(0)
    model = _LengthsLogits().double()
    sample = _length_data(0)[0]
    parts = engine.partition(model, 2, balance="uniform", sample=sample)
    pipe = engine.Pipeline(Solo(), list(parts), engine.schedules.interleaved_1f1b(1, 2, 2),
                           loss_fn=_token_loss)
    kept = []
    for length in (3, 4, 6, 7, 3, 6, 4):
        x, y = _length_data(1, length)
        with torch.no_grad():
            want = _token_loss(model(x), y).item()
        assert pipe.eval_step(x, y) == pytest.approx(want, rel=1e-12), length
        kept.append(sorted(k[0][-1] for k in pipe.reshaped.forms))
    first = sample.shape[-1]
    assert all(len(k) <= 3 and first in k for k in kept), kept


class _Windowed(nn.Module):
    """Inputs longer than its window folded into rows of windows for the
    blocks, unfolded after them by the rows' count read before (``B, T =
    idx.size()``): at such lengths a value not a tensor crosses the blocks,
    which are not cut apart; at others they are."""
    def __init__(self, w=6, vocab=7, blocks=3, window=6):
        super().__init__()
        self.window = window
        self.wte, self.wpe = nn.Embedding(vocab, w), nn.Embedding(window, w)
        self.h = nn.ModuleList(_CausalBlock(w) for _ in range(blocks))
        self.head = nn.Linear(w, vocab)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        x = self.wte(idx)
        if T > self.window:
            x = x.view(B * T // self.window, self.window, -1)
        n = x.size(1)
        x = x + self.wpe(torch.arange(0, n, device=idx.device))
        mask = torch.ones((n, n), dtype=torch.bool, device=idx.device).triu(1)
        for block in self.h:
            x = block(x, mask)
        if T > self.window:
            x = x.view(B, T, -1)
        return _token_loss(self.head(x), targets)


_WINDOWED = ((0, 5), (1, 12), (2, 3))      # (data, length) of each step: 12 is cut otherwise


def _windowed_worker(world):
    """pp=2: steps at _WINDOWED's lengths, the later stage's rank given no
    inputs; what each step raised, and the state trained."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    job = engine.distribute(_Windowed().double(), mesh.grid(world, pp=2), schedule="1f1b",
                            microbatches=2, balance="uniform", sample=_length_data(0, 5)[0],
                            timeout=60, reps=1, verbose=False, overhead=0.0)     # (DRY)
    opt = torch.optim.SGD(job.parameters(), lr=LR)
    said = []
    for step, length in _WINDOWED:
        x, y = _length_data(step, length)
        opt.zero_grad()
        try:
            job.step(x if job.pipeline.first else None, y)
            opt.step()
            said.append(None)
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
    state = job.state_dict()
    return said, None if state is None else {k: v.tolist() for k, v in state.items()}


@pytest.mark.timeout(120)
def test_a_length_whose_trace_cuts_the_model_otherwise_fails_the_step_naming_both_cuts():
    """A step at a length whose trace cuts the model into other pieces (a
    forward folding long inputs into windows, which reads the rows' count
    across the blocks there) warned, then ran the sample's pieces, which
    raised their AssertionError ("took (-1, 5, 6) for a size..."). It
    fails on every rank with a ValueError naming the shapes, both cuts and
    what to do, rolled back; the steps around it train as one process."""
    (said0, state), (said1, _) = mesh.spawn(_windowed_worker, 2, timeout=100, env=PATIENT)
    assert said0[0] is None and said0[2] is None and said1[0] is None and said1[2] is None
    refused = (r"_Windowed.forward at inputs of shapes \[\(12,\)\] \(rows aside\) is cut "
               r"into 2 pieces, \[wte..h.2, head\], not the 4 the stages hold, \[wte..h.0, "
               r"h.1, h.2, head\], as at the sample's shapes \[\(5,\)\]: .* Give the steps "
               r"inputs of shapes the forward cuts alike")
    import re
    assert re.match(r"ValueError: rank 0 \(pp rank 0\): " + refused, said0[1]), said0[1]
    assert "pipeline step 1 failed on pp rank 0: ValueError: " in said1[1], said1[1]
    assert "AssertionError" not in said0[1] + said1[1]
    torch.manual_seed(0)
    model = _Windowed().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, length in _WINDOWED[::2]:
        opt.zero_grad()
        model(*_length_data(step, length)).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(state[k], dtype=v.dtype), v, msg=k)


def _retrace_fails_worker(world):
    """tp=2: distribute with what traces the model again at a step's shapes
    (its Reshaped, made after the Job) raising on tp rank 1 alone (what
    distribute raised); then a job, a step at a new length whose trace
    raises on tp rank 1 alone (a KeyboardInterrupt as it traces), then
    steps at that length and at another; the state trained."""
    torch.set_num_threads(1)

    def distributed():
        torch.manual_seed(0)
        return engine.distribute(_Lengths().double(), mesh.grid(world, pp=1, tp=2),
                                 schedule="1f1b", microbatches=2, balance="uniform",
                                 sample=_length_data(0)[0],
                                 plan={"h.*.fc": "colwise", "h.*.out": "rowwise"}, timeout=30,
                                 reps=1, verbose=False, overhead=0.0)     # (DRY)
    if world.rank == 1:
        interrupt_call("engine.distribute", "Reshaped", 1, "stopped on purpose on rank 1")
    try:
        distributed()
        made = "returned"
    except BaseException as e:
        made = f"{type(e).__name__}: {e}"
    job = distributed()
    opt = torch.optim.SGD(job.parameters(), lr=LR)
    if world.rank == 1:
        real = engine.traced.Reshaped._traced

        def interrupted(self, inputs, key):
            engine.traced.Reshaped._traced = real       # (this trace only)
            raise KeyboardInterrupt
        engine.traced.Reshaped._traced = interrupted
    said = []
    for step, length in ((1, 6), (1, 6), (2, 3)):
        opt.zero_grad()
        try:
            job.step(*_length_data(step, length))
            opt.step()
            said.append(None)
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    state = job.state_dict()
    return made, said, None if state is None else {k: v.tolist() for k, v in state.items()}


@pytest.mark.timeout(120)
def test_a_trace_at_new_shapes_failing_on_one_rank_fails_the_step_on_every_rank():
    """The job traced its model again at a step's new shapes before the
    step: an error there (a KeyboardInterrupt as it traced) raised on that
    rank alone, and its peers ran the step without it, their collectives
    meeting its next step's (a MismatchError), and so on, every step after.
    Now it is the step's own: it fails on every rank, rolled back, and the
    steps after train as one process. An error as distribute makes what
    traces again (after the Job) was dropped: that rank's distribute
    returned the Job half made, with no retrace, and its peers' a whole
    one. Now distribute fails on every rank, the others naming it."""
    (made0, said0, state), (made1, said1, _) = mesh.spawn(_retrace_fails_worker, 2,
                                                          timeout=100)
    assert made1 == "KeyboardInterrupt: stopped on purpose on rank 1", made1
    assert made0 == ("DistributeFailed: rank 0: engine.distribute failed on rank 1: "
                     "KeyboardInterrupt: stopped on purpose on rank 1"), made0
    assert said1[0] == "KeyboardInterrupt: ", said1
    assert said0[0].startswith("MeshError: rank 0: all_reduce") and \
        "pipeline step 0 failed on pp rank 0 (tp rank 1): KeyboardInterrupt" in said0[0], said0
    assert said0[1:] == said1[1:] == [None, None], (said0, said1)
    torch.manual_seed(0)
    model = _Lengths().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, length in ((1, 6), (2, 3)):
        opt.zero_grad()
        model(*_length_data(step, length)).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(state[k], dtype=v.dtype), v, msg=k)


def test_a_trace_at_new_shapes_reads_its_own_constants_and_refuses_another_cut():
    """A tensor the forward makes of constants (``torch.tensor(2.0)``) is
    named anew by each trace (``_tensor_constant1``...): the pieces read the
    new one, kept out of their state dicts; a trace at new shapes that cuts
    the model otherwise is refused with a ValueError naming both cuts (it
    warned, then the sample's pieces ran and raised their AssertionError)."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            # longer inputs: a size of the rows read after the blocks, no cut between them
            shape = (x.size(0), -1, 4) if x.size(1) > 6 else (-1, x.size(1), 4)
            x = x * torch.tensor(2.0)
            for block in self.h:
                x = block(x)
            return x.view(shape)
    model = Scaled()
    x = torch.randn(3, 5, 4)
    seq = engine.sequential(model, sample=x)
    keys = [list(p.state_dict()) for p in seq]
    reshaped = engine.traced.Reshaped(model, seq, [0, 1, 2], None, False, 1, x)
    x = torch.randn(2, 6, 4)
    reshaped.at(x)
    torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)
    assert [list(p.state_dict()) for p in seq] == keys
    x = torch.randn(2, 7, 4)
    with pytest.raises(ValueError, match=r"^Scaled.forward at inputs of shapes \[\(7, 4\)\] "
                                         r"\(rows aside\) is cut into 1 pieces, \[h.0..h.2\], "
                                         r"not the 3 the stages hold, \[h.0, h.1, h.2\], as at "
                                         r"the sample's shapes \[\(5, 4\)\]: a step cannot"):
        reshaped.at(x)
    x = torch.randn(2, 6, 4)        # (the pieces as they were: at the last shapes taken)
    torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["masked", "unet", "hf"])
@pytest.mark.parametrize("pieces", [2, None], ids=["first-two", "all"])
def test_a_stage_of_pieces_recomputes_layer_by_layer_as_it_keeps(kind, pieces):
    """TorchStage(layered=True) over a traced model's pieces, tuples between
    them (a mask that needs no gradient, skips that do, a forward of two
    inputs; the first two pieces hand on a tuple): the output, the input
    gradient and every weight gradient, whole backward and split (I then
    W), those of keeping."""
    from engine.torch_stage import TorchStage
    x, _ = _skip_data(kind, 0)
    got = []
    for layered in (False, True):
        seq = engine.sequential(_skip_model(kind), target=True, inputs=2 if kind == "hf" else 1)
        stage = TorchStage(torch.nn.Sequential(*list(seq)[:pieces]), layered, layered=layered)
        out = []
        for split in (False, True):
            for p in stage.module.parameters():
                p.grad = None
            y, ctx = stage.forward(x)
            gy = tuple(None if i in y.fixed else torch.ones_like(v) for i, v in enumerate(y)) \
                if isinstance(y, tuple) else torch.ones_like(y)
            if split:
                gx, wctx = stage.backward_input(ctx, gy)
                stage.backward_weight(wctx)
            else:
                gx = stage.backward(ctx, gy)
            out.append((y, gx, [p.grad.clone() for p in stage.module.parameters()
                                if p.grad is not None]))
        got.append(out)

    def same(a, b):
        if isinstance(a, (tuple, list)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return (a is None and b is None) or torch.equal(a, b)
    assert same(got[0], got[1])


def test_a_forward_returning_several_outputs_is_told_to_return_the_one_the_loss_reads():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return {"pred": self.b(h), "hidden": h}
    with pytest.raises(TypeError, match=r"Two.forward returns 2 tensors \(a tuple, a list or "
                                        r"a dict\); .* make the forward return the output the "
                                        r"loss reads \(the loss given as loss_fn=\)"):
        engine.traced.sequential(Two())


class _PositionIds(nn.Module):
    """Hugging Face's positions (BERT, ViT...): a buffer of ids sliced by the
    input's length, persistent or not."""
    def __init__(self, persistent):
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(6, 4)
        self.register_buffer("position_ids", torch.arange(6).expand(1, -1),
                             persistent=persistent)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(self.position_ids[:, :ids.shape[1]])
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


def _position_worker(world, persistent):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    job = engine.distribute(_PositionIds(persistent), mesh.grid(world, pp=2), schedule="1f1b",
                            microbatches=2, balance="parameters", overhead=1e-4,
                            sample=torch.zeros(4, 5, dtype=torch.long),
                            loss_fn=lambda y, t: F.mse_loss(y, t), timeout=60, verbose=False)
    return job.state_dict()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("persistent", [True, False])
def test_a_buffer_sliced_by_the_inputs_length_is_traced_and_kept_as_it_was(persistent):
    """torch.fx left the buffer a plain tensor, which a traced length cannot
    slice; now it is read where it is, and stays out of the pieces' state
    dicts (and the job's) when it is out of the model's."""
    torch.manual_seed(0)
    model = _PositionIds(persistent)
    seq = engine.sequential(model)
    x = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)
    assert [k for k in seq.state_dict() if "position" in k] == (
        ["0.position_ids"] if persistent else [])
    state = mesh.spawn(_position_worker, 2, persistent, timeout=180, env=PATIENT)[0]
    assert list(state) == list(model.state_dict())
    copy = _PositionIds(persistent)
    copy.load_state_dict(state)                     # strict: the model's own keys
    torch.testing.assert_close(copy(x), model(x), rtol=0, atol=0)


class _Tril(nn.Module):
    """A causal mask made from the input's length, its sizes one by one."""
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        T = x.size(1)
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for block in self.h:
            x = torch.tanh(block(x)).masked_fill(~mask[:, :4], 0.0)
        return x


def test_a_mask_made_of_the_lengths_one_by_one_is_traced():
    """``torch.ones(T, T)`` of a traced T raised in torch.fx ("ones() takes 1
    positional argument but 2 were given"): a forward making its causal mask
    so could not be traced at all; the sizes go as one tuple, and torch's
    own factories are left as they were."""
    model, ones = _Tril(), torch.ones
    seq = engine.sequential(model)
    assert len(seq) == 3 and torch.ones is ones
    for length in (4, 6):
        x = torch.randn(2, length, 4)
        torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)
    assert "torch.ones((" in seq[0].code


class _Constant(nn.Module):
    """A tensor made of constants in the forward (``torch.tensor(2.0)``)."""
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        x = x * torch.tensor(2.0)
        for block in self.h:
            x = block(x)
        return x


def test_a_tensor_the_forward_makes_of_constants_is_no_state_and_no_branch():
    """fx sets such a tensor aside under a name of its own, another each
    trace: the trace in the other mode named it otherwise, which was taken
    for a branch on self.training (a warning, and the mode's reads left
    baked), and the pieces held it as a buffer (a job's state dict had a
    key, ``_tensor_constant0``, that the model's has not: strict loading
    refused it)."""
    import warnings
    model = _Constant()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seq = engine.sequential(model)
    assert [k for p in seq for k in p.state_dict()] == list(model.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)


def _meta_buffer_worker(world):
    import warnings
    torch.set_num_threads(1)
    with torch.device("meta"):
        model = _PositionIds(persistent=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.distribute(model, mesh.grid(world, pp=2), schedule="1f1b", microbatches=2,
                          balance="parameters", overhead=1e-4, loss_fn=F.mse_loss,
                          sample=torch.zeros(4, 5, dtype=torch.long), timeout=60,
                          verbose=False)
    return [str(w.message) for w in caught if "meta device" in str(w.message)]


@pytest.mark.timeout(200)
def test_a_meta_models_buffers_out_of_the_state_dict_are_named_as_load_cannot_fill_them():
    """A buffer with persistent=False (a causal mask, position ids) is zeros
    on a stage made from the meta device, and job.load_state_dict() cannot
    fill it (no state dict holds it): the warning said it would."""
    first, second = mesh.spawn(_meta_buffer_worker, 2, timeout=180, env=PATIENT)
    assert len(first) == 1 and "stage 0: 0.position_ids (buffers with persistent=False) " \
        "are in no state dict: only init= fills them" in first[0], first
    assert "persistent=False" not in "".join(second), second    # (no such buffer there)


class _Flagged(nn.Module):
    """A buffer read for its value (a flag), not computed with."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("deep", torch.tensor(3))

    def forward(self, x):
        x = self.a(x)
        if self.deep.item() > 2:
            x = x * self.scale
        return self.b(x)


def test_a_buffer_read_as_a_flag_still_traces():
    """Buffers traced as graph values (for position ids sliced by the input's
    length) made a forward that branches on one untraceable; it traces as
    before, the flag's value taken when traced."""
    torch.manual_seed(0)
    model = _Flagged()
    x = torch.randn(2, 4)
    assert torch.allclose(engine.sequential(model)(x), model(x))


class _Criterion(nn.Module):
    """A loss module of the model's own (class weights, a buffer in its
    state dict), or one made in the forward as Hugging Face's models do
    (``loss_fct = CrossEntropyLoss()``), and modules the forward never
    calls (a pooler, a counter)."""

    def __init__(self, made_in_forward=False):
        super().__init__()
        self.made_in_forward = made_in_forward
        self.inp = nn.Linear(5, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.out = nn.Linear(6, 3)
        self.criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
        self.pooler = nn.Linear(6, 6)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x, labels=None):
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        logits = self.out(h)
        loss_fct = nn.CrossEntropyLoss() if self.made_in_forward else self.criterion
        return {"logits": logits, "loss": loss_fct(logits, labels)}


def _criterion_data(step):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(ROWS, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (ROWS,), generator=g))


def test_a_loss_module_is_part_of_the_loss():
    """A criterion submodule without parameters was refused as a layer the
    target feeds, and one made in the forward could not be traced at all
    (NameError: module is not installed as a submodule)."""
    x, y = _criterion_data(0)
    for made in (False, True):
        torch.manual_seed(0)
        model = _Criterion(made).double()
        seq = engine.sequential(model, target=True)
        assert len(seq) == 5           # inp, each block, out
        torch.testing.assert_close(seq.loss(seq(x), y), model(x, y)["loss"], rtol=0, atol=0)


class _OwnLoss(nn.Module):
    """A model whose own loss is ``how``: a cross entropy run per token
    ("ce": with label smoothing), or a loss that is not one mean cross
    entropy alone, left as written."""

    def __init__(self, how):
        super().__init__()
        self.how, self.out = how, nn.Linear(5, 3)

    def forward(self, x, targets=None):
        o = self.out(x)
        if self.how == "ce":
            return o, F.cross_entropy(o, targets, ignore_index=2, label_smoothing=0.1)
        if self.how == "aux":        # (a z-loss-like term of the target's logit)
            return o, F.cross_entropy(o, targets) + o.gather(1, targets[:, None]).pow(2).mean()
        if self.how == "scaled":
            return o, 2 * F.cross_entropy(o, targets)
        if self.how == "sum":
            return o, F.cross_entropy(o, targets, reduction="sum")
        return o, F.mse_loss(o, targets)


def test_a_mean_cross_entropy_runs_as_its_per_token_sum_and_count():
    """A traced model's own mean cross entropy (nanoGPT's ignore_index=-1, a
    criterion with class weights, one made in the forward, Hugging Face's
    shifted one) and an nn.CrossEntropyLoss / nn.NLLLoss given as loss_fn
    run as (the sum, the count torch's mean divides by): over micro-batches,
    one process's mean (weights, label smoothing, probabilities as targets
    too). Any other loss, a function of the user's own, stays as written."""
    from engine.per_token_loss import summed
    from engine.torch_stage import torch_loss

    def split_alike(fn, whole, out, y, rows=2):
        form = summed(fn)
        assert form is not None
        parts = [form(out[i:i + rows], y[i:i + rows]) for i in range(0, len(out), rows)]
        got = sum(s for s, _ in parts) / sum(c for _, c in parts)
        torch.testing.assert_close(got, whole, rtol=1e-12, atol=0)
        pair = torch_loss(fn)(out[:rows], y[:rows])       # (sum, gradient, count)
        assert len(pair) == 3 and len(torch_loss(fn).as_written(out[:rows], y[:rows])) == 2

    x, y = _ignored(0)
    gpt = _gpt()
    seq = engine.sequential(gpt, target=True)
    split_alike(seq.loss, gpt(x, y)[1], seq(x), y)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 2, 2])
    for made in (False, True):
        model = _Criterion(made).double()
        seq = engine.sequential(model, target=True)
        split_alike(seq.loss, model(xs, ys)["loss"], seq(xs), ys)
    model = _OwnLoss("ce").double()
    seq = engine.sequential(model, target=True)
    split_alike(seq.loss, model(xs, ys)[1], seq(xs), ys)
    shifted = _Shifted().double()
    seq = engine.sequential(shifted, target=True)
    ids = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 1, -100], [2, -100, -100], [1, 1, 0], [0, 2, 1]])
    split_alike(seq.loss, shifted(ids, labels=labels)["loss"], seq(ids), labels)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    probs = torch.rand(6, 3, generator=g, dtype=torch.float64).softmax(1)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    for fn, target in [(nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.2), ys),
                       (nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), probs),
                       (nn.NLLLoss(weight=w), ys)]:
        out = logits.log_softmax(1) if isinstance(fn, nn.NLLLoss) else logits
        split_alike(fn, fn(out, target), out, target)
    for how in ("aux", "scaled", "sum", "mse"):
        seq = engine.sequential(_OwnLoss(how).double(), target=True)
        assert summed(seq.loss) is None, how
        assert len(torch_loss(seq.loss)(logits, logits if how == "mse" else ys)) == 2, how
    assert summed(nn.CrossEntropyLoss(reduction="sum")) is None
    assert summed(lambda o, t: F.cross_entropy(o, t)) is None
    criterion = nn.CrossEntropyLoss()
    form = summed(criterion)
    criterion.reduction = "sum"         # (changed after: read at each call)
    assert form(logits, ys).dim() == 0


def test_what_the_forward_computes_under_no_grad_gets_no_gradient():
    """torch.fx keeps no grad mode: a scale computed under torch.no_grad()
    in the forward was differentiated through in the pieces."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            h = self.a(x)
            with torch.no_grad():
                scale = h.norm(dim=-1, keepdim=True) + 1
            for block in self.blocks:
                h = torch.tanh(block(h / scale))
            return self.b(h)
    torch.manual_seed(0)
    model, x = Scaled().double(), torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():       # (tracing under no_grad: only the forward's own counts)
        seq = engine.sequential(model)
    grads = []
    for run in (model, seq):
        model.zero_grad()
        run(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_what_the_forward_reads_of_self_training_follows_the_pieces_mode():
    """fx baked ``F.dropout(h, 0.5, self.training)`` as ``training=True``:
    the pieces dropped out in eval mode (eval_step) too."""
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.dropout(self.a(x), 0.5, self.training))
    model, x = Drop(), torch.randn(8, 4)
    seq = engine.sequential(model)
    model.eval(), seq.eval()
    torch.testing.assert_close(seq(x), model(x), rtol=0, atol=0)
    seq.train()
    torch.manual_seed(0)
    dropped = seq(x)
    model.train()
    torch.manual_seed(0)
    torch.testing.assert_close(dropped, model(x), rtol=0, atol=0)

    class Branch(Drop):
        def forward(self, x):
            h = self.a(x)
            return self.b(h * 2 if self.training else h)
    with pytest.warns(UserWarning, match=r"Branch.forward branches on self.training: its "
                                         r"pieces run the training mode's branch"):
        engine.sequential(Branch())


def test_autocast_in_the_forward_is_named():
    """torch.fx records no autocast: the pieces ran in float32 what the
    model ran in bfloat16, without a word."""
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.a(x)
            return self.b(h.float())
    with pytest.warns(UserWarning, match=r"Cast.forward computes part of its output under "
                                         r"torch.autocast, which torch.fx does not record"):
        engine.sequential(Cast())
    class Plain(Cast):
        def forward(self, x):
            return self.b(self.a(x))
    import warnings
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")          # (the caller's own autocast: nothing said)
        assert len(engine.sequential(Plain())) == 2


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        h = self.a(x)
        h.masked_fill_(h > 0.5, 0.5)        # a change of an activation
        r = h
        h *= 1.5                            # r too (fx made it h = h * 1.5)
        g = self.b(h + r)
        g[:, 1:].mul_(3)                    # through a view of it
        rows = g[:, 0] > 0
        g[rows] += g[rows, 2:3]             # item assignment (an MoE's out[rows] += y)
        g[:, 1] = g[:, 3]
        self.act(g)                         # an in-place module, its result unread
        self.calls.add_(1)                  # a buffer's
        return self.c(g)


def test_a_change_made_in_place_in_the_forward_is_kept():
    """torch.fx records ``h.mul_(2)`` but later reads of h read h's node:
    the pieces, kept by what the output reads, dropped the change (and a
    buffer's ``add_``) and computed another model without a word; and it
    traced ``h *= 1.5`` as ``h = h * 1.5``, leaving another name of h as
    it was; and it refused item assignment (``g[rows] += y``: "'Proxy'
    object does not support item assignment")."""
    torch.manual_seed(0)
    model, x = _InPlace().double(), torch.randn(5, 4, dtype=torch.float64)
    seq = engine.sequential(model)
    assert len(seq) == 3        # cut after each change, never between a value and its change
    outs, grads = [], []
    for run in (model, seq):
        model.zero_grad()
        y = run(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert float(model.calls) == 2              # once by each forward


def _in_place_worker(world):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _InPlace().double()
    job = engine.distribute(model, mesh.grid(world, pp=2), schedule="1f1b", microbatches=1,
                            balance="parameters", loss_fn=F.mse_loss, timeout=60,
                            verbose=False)
    return _trained(job, _in_place_data)["state"]


def _in_place_data(step):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(6, 4, generator=g, dtype=torch.float64),
            torch.randn(6, 2, generator=g, dtype=torch.float64))


@pytest.mark.timeout(300)
def test_a_pipeline_of_a_forward_with_in_place_changes_trains_as_one_process():
    results = mesh.spawn(_in_place_worker, 2, timeout=280, env=PATIENT)
    torch.manual_seed(0)
    model = _InPlace().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = _in_place_data(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(results[0][k], v.numpy(), rtol=1e-12, atol=1e-12, err_msg=k)


def _criterion_worker(world):
    torch.set_num_threads(1)
    out = {}
    for meta in (False, True):
        torch.manual_seed(0)
        with torch.device("meta" if meta else "cpu"):
            model = _Criterion().double()
        job = engine.distribute(model, mesh.grid(world, pp=2), schedule="1f1b", microbatches=2,
                                balance="parameters", timeout=60, verbose=False)
        torch.manual_seed(3)
        other = _Criterion().double()         # other weights, class weights included
        other.criterion.weight.copy_(torch.tensor([0.5, 1.0, 3.0]))
        job.load_state_dict(other.state_dict())
        out[meta] = _trained(job, _criterion_data)
    return out


@pytest.mark.timeout(300)
def test_the_state_of_what_no_stage_holds_is_saved_and_loaded():
    """The loss's class weights and the modules the forward never calls
    were in no stage: job.state_dict() lacked them (a fresh model's
    load_state_dict refused it) and job.load_state_dict() left the loss's
    weights as built; from the meta device the loss read meta tensors.
    Two micro-batches: the weighted mean runs as its sum over the sum of
    the class weights of the targets (torch's own denominator)."""
    results = mesh.spawn(_criterion_worker, 2, timeout=280, env=PATIENT)
    torch.manual_seed(3)
    model = _Criterion().double()
    model.criterion.weight.copy_(torch.tensor([0.5, 1.0, 3.0]))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(*_criterion_data(step))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for meta in (False, True):
        state = trained_alike([r[meta] for r in results], losses, model.state_dict())
        _Criterion().double().load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


def test_what_saved_pieces_name_is_still_in_engine_traced():
    """A piece or a last stage saved before engine.traced was split into
    traced_*.py names its helpers as ``engine.traced``'s (a GraphModule's
    code imports ``_alone``, ``_given``, ``_detached``; ``returned`` pickles
    ``_Returned``, ``_Made``, ``_Output``): they stay importable there, so
    those files load."""
    for name in ("_alone", "_given", "_detached", "_Made", "_Output", "_Returned",
                 "sequential", "traceable", "few", "given_as_returned", "Reshaped",
                 "called_whole"):
        assert hasattr(engine.traced, name), name
