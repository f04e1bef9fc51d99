"""One step of a Pipeline on one rank: its state, and its actions run.

``_StepActions`` holds what each action leaves for a later one (inputs,
contexts, gradients, outputs to send, keyed by (stage, micro-batch)) and
the requests in flight: ``start`` cuts the batch and posts every receive,
``run`` executes one action (a stage's F, B, I or W with the loss at the
last stage; a SEND's message, a tuple as a header then its parts; a
RECV's wait; a dp all-reduce; an optimizer step), ``finish`` waits for
the step's sends and all-reduces and makes the gradient sums, and
``settle``, once the ranks agreed, scales a per-token loss's gradients
by its count (engine.per_token) and adds back what they held. What a
failed step does (abort, agree, roll back) is engine.rollback's ``_Step``,
built on this class; engine.executor's Pipeline drives it.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

import collectives
from mesh import LostPeerError, MeshError

from .grad_wire import post, wired
from .ir import AR, OPT, B, F, I, W, RECV_B, RECV_F, SEND_B, SEND_F, Action, message_key
from .per_token import Counts, count_reports
from .scaled import UNSCALED, LossScale
from .pipeline_args import _PAIRED, _paired, rows_of, split_microbatches
from .torch_stage import (Parts, TorchStage, as_pipeline_loss, copied, first_loss,
                          torch_targets)
from .tensor_parallel import rewatched, watch_of
from .tp_plan import PlanError, forget_exits, split_by

if TYPE_CHECKING:
    from .executor import Pipeline

_PARTS = "meshrun.parts"  # a tuple's header: its length; its parts follow on the same tag


def _forward_only(stage: Any, x: Any) -> Any:
    """A stage's output for ``x`` with nothing kept for a backward: a
    TorchStage's without autograd's graph, another's forward's output."""
    if isinstance(stage, TorchStage):
        return stage.forward_only(x)
    return stage.forward(x)[0]


def _noted(e: BaseException, note: str) -> None:
    """Add ``note`` to ``e`` (Python 3.11's notes, shown under its
    traceback; its class and message stay the user's), unless its message
    says where it was raised already."""
    if hasattr(e, "add_note") and not isinstance(e, MeshError) and \
            note.split(":")[0] not in str(e):
        e.add_note(note)


def _shapes(v: Any) -> Any:
    """``v``'s shape; a list of its parts' where it is a tuple of tensors
    (None for a part without one); None where it has none."""
    if isinstance(v, tuple):
        return [_shapes(part) for part in v]
    shape = getattr(v, "shape", None)
    return None if shape is None else tuple(shape)


def _fits(got: Any, want: Any) -> bool:
    """Whether a gradient's shapes (``_shapes``) are those of the value it
    is the gradient of; a part without a gradient (a mask's) fits."""
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(g is None or _fits(g, w)
                                             for g, w in zip(got, want))
    return got == want


def _in_action(e: MeshError, where: str) -> MeshError:
    """``e`` again (its class, its peer, its traceback), its message saying
    ``where`` after the rank that raised it: a receive's own message names
    only its tag."""
    msg = str(e)
    head, sep, rest = msg.partition(": ")
    if not (sep and head.startswith("rank ")):
        head, rest = "", msg
    text = f"{head}: {where}: {rest}" if head else f"{where}: {rest}"
    try:
        new = type(e)(text, e.peer) if isinstance(e, LostPeerError) else type(e)(text)
    except Exception:                        # a class with its own arguments: as it was
        return e
    new.__dict__.update(e.__dict__)          # (from_abort: another rank's failure)
    return new.with_traceback(e.__traceback__)


_Key = tuple[int, int]


def _elements(targets: Any) -> float:
    """How many elements ``targets`` holds (a tuple's: its first part's;
    rows where it has no size): what a count of tokens is at most."""
    first = targets[0] if isinstance(targets, tuple) and targets else targets
    numel = getattr(first, "numel", None)
    size = numel() if callable(numel) else getattr(first, "size", None)
    return float(size) if isinstance(size, (int, np.integer)) else float(len(first))


def _key(a: Action) -> _Key:
    assert a.mb is not None
    return (a.stage, a.mb)


class _StepActions:
    """The state of one step on one rank: what each action leaves for a later
    one, keyed by (stage, micro-batch), and the requests still in flight."""

    def __init__(self, pipe: Pipeline, n: int, forward_only: bool = False,
                 scaler: Any = None) -> None:
        self.pipe, self.n = pipe, n
        self.scaler, self.scaled = scaler, UNSCALED    # step(scaler=): engine.scaled
        self.forward_only = forward_only     # eval_step's: no backward, no gradient touched
        self.program = pipe.forward_program if forward_only else pipe.program
        self.outs_last: dict[int, Any] = {}  # eval_step's: the last stage's outputs
        self.xs: dict[_Key, Any] = {}
        self.gys: dict[_Key, Any] = {}
        self.outs: dict[_Key, Any] = {}
        self.ctxs: dict[_Key, Any] = {}
        self.in_shapes: dict[_Key, Any] = {}   # each forward's input's (_shapes)
        self.wctxs: dict[_Key, Any] = {}
        self.targets: list[Any] = []
        self.weights: list[float] = []
        self.losses = [0.0] * pipe.schedule.num_microbatches
        # whether the losses are per-token and their counts (engine.per_token)
        self.counts = Counts()
        self.prior: dict[int, list[Any]] = {}
        self.before: dict[int, list[Any]] = {}
        self.stepped: dict[int, list[Any]] = {}   # weights before this step's first OPT
        self.opted: set[int] = set()              # the stages whose OPT ran
        self.opt_state: Any = None                # the optimizer's, before its first
        self.recvs: dict[Action, Any] = {}
        self.sends: list[Any] = []
        self.syncs: dict[int, list[Any]] = {}
        # the sum of the replicas' rows, not yet made (a last stage's, with dp replicas)
        self.rows_pending = pipe.last and pipe.dp is not None and pipe.dp.size > 1
        # this replica's share of the step's loss (its last stage's ranks: ``mean_loss``),
        # and the step's, which every rank learns in the closing all-reduce (``agree``)
        self.share: float | None = None
        self.loss: float | None = None
        self.tp_seq = pipe.tp.collective_channel().seq if pipe.tp is not None else 0
        # this replica's rows of inputs (stage 0's ranks) and of targets (the last
        # stage's), -1 where this rank was given none: compared at the step's end
        self.in_rows = self.target_rows = -1

    def start(self, inputs: Any, targets: Any) -> None:
        """Split the batch and post every receive of the step."""
        pipe = self.pipe
        m = pipe.schedule.num_microbatches
        call = "eval_step()" if self.forward_only else "step()"
        # (ZeRO stage 3: the parameters other replicas own, broadcast from them, in flight
        # while the step starts, each stage waiting for its own before it computes; or each
        # module's gathered as it runs: engine.zero_layers)
        pipe.owned_params.begin(self.n, self.forward_only)
        if not self.forward_only:
            self.scaled = LossScale.of(self.scaler, pipe)
            self.before = self._snapshot()
            pipe.tied.start()
            pipe.tp_sums.start()
        if pipe.seq_split is not None:      # (an sp rank: its part of the sequence)
            inputs, targets = pipe.seq_split(inputs, targets, call)
        if pipe.before_step is not None or pipe.reshaped is not None:
            pipe.owned_params.wait()        # (a traced model traced again may read them)
        if pipe.before_step is not None:
            pipe.before_step()
        elif pipe.reshaped is not None:     # (engine.partition's stages: at these inputs)
            pipe.reshaped.step(inputs)
        if pipe.first:
            if inputs is None:
                raise ValueError(f"pp rank {pipe.rank} holds stage 0: {call} needs inputs")
            try:
                xs = split_microbatches(inputs, m)
            except ValueError as e:
                raise ValueError(f"pp rank {pipe.rank}: {call}'s inputs: {e}") from None
            self.xs.update({(0, k): x for k, x in enumerate(xs)})
            self.in_rows = rows_of(inputs)
        # (eval_step's targets None, no dp replicas: outputs only, no loss)
        if pipe.last and not (targets is None and self.forward_only and not self.rows_pending):
            if targets is None and not self.forward_only:
                raise ValueError(f"pp rank {pipe.rank} holds the last stage: {call} needs targets")
            if targets is not None:
                try:
                    self.target_rows = rows_of(targets)
                except ValueError as e:
                    raise ValueError(f"pp rank {pipe.rank}: {call}'s targets: {e}") from None
            if pipe.first and targets is not None and not _paired(self.in_rows,
                                                                  self.target_rows, m):
                # (across ranks, agree() compares them: the step fails on every rank)
                raise ValueError(f"pp rank {pipe.rank}: {call}: its inputs have {self.in_rows} "
                                 f"rows but its targets {self.target_rows}: {_PAIRED.format(m=m)}")
            try:
                self.targets = [] if targets is None else split_microbatches(targets, m)
            except ValueError as e:
                raise ValueError(f"pp rank {pipe.rank}: {call}'s targets: {e}") from None
            # rows, not len(): a tuple of targets (labels and a mask) has its parts' rows
            total = sum(rows_of(t) for t in self.targets)
            share = 1.0     # this replica's rows over the mean replica's (dp replicas may differ)
            elements = 0.0 if targets is None else _elements(targets)
            if self.rows_pending:
                assert pipe.dp is not None
                self.rows_pending = False
                # (with them, how many replicas have targets: eval_step's may be None, on all;
                # and the targets' elements, a per-token loss's seed's divisor under a scaler)
                rows = np.array([total, targets is not None, elements], dtype=np.float64)
                collectives.all_reduce(pipe.dp, rows, op="sum")
                having, elements = int(rows[1]), float(rows[2])
                if having not in (0, pipe.dp.size):
                    raise ValueError(f"pp rank {pipe.rank}: {call}: {having} of {pipe.dp.size} "
                                     f"dp replicas gave targets, the others None: all do, or "
                                     f"none (outputs only)")
                if not having:
                    return self._post_receives()
                share = total * pipe.dp.size / float(rows[0])
            # each micro-batch's loss gradient weighed by its share of the global batch
            # (times dp, which the average over dp divides out): every stage's gradients,
            # linear in it, are then the global mean loss's
            self.weights = [rows_of(t) / total * share for t in self.targets]
            self.scaled.per_token(elements)
        if not self.forward_only:
            self.prior = self._save_prior()
        self._post_receives()

    def _post_receives(self) -> None:
        """Post every receive of the step's program."""
        pipe = self.pipe
        for a in self.program:
            if a.kind in (RECV_F, RECV_B):
                self.recvs[a] = pipe.pp.irecv(pipe.schedule.rank_of(message_key(a)[1]),
                                              tag=pipe._tag(a, self.n))

    def run(self, a: Action) -> str:
        """Execute one action; return its flow direction for the trace."""
        pipe, sched = self.pipe, self.pipe.schedule
        if a.kind in (F, B, I, W):
            with pipe.owned_params.computing(a.stage):  # (ZeRO stage 3: its parameters)
                try:
                    if a.kind == F:
                        self._forward(a)
                    elif a.kind == W:
                        pipe.stages[a.stage].backward_weight(self.wctxs.pop(_key(a)))
                    else:
                        self._backward(a)
                except Exception as e:
                    _noted(e, self._computing(a, self.in_shapes.get(_key(a)) if a.kind == F
                                              else None))
                    raise
        elif a.kind in (SEND_F, SEND_B):
            dst, tag = sched.rank_of(message_key(a)[2]), pipe._tag(a, self.n)
            value = self.outs.pop(_key(a))
            parts = [value]
            # a colwise output cut off by the stage's end (its layer the stage's last) is
            # told as one, so the next stage's rank watches it too: a layer the plan leaves
            # whole there raised torch's shape error alone, naming neither (tensor_parallel)
            watched = [(i, w) for i, v in enumerate(value if isinstance(value, tuple)
                                                    else (value,))
                       for w in [watch_of(v)] if w is not None]
            # a traced model whose pieces hold its inputs' shapes: the first micro-batch's
            # header tells them, so the next stage's rank, given no inputs, runs at them too
            told = (pipe.reshaped.told() if pipe.reshaped is not None and a.kind == SEND_F
                    and a.mb == 0 else None)
            if isinstance(value, tuple) or watched or told:   # a header, then each part
                many = value if isinstance(value, tuple) else (value,)
                header = {_PARTS: len(many), "none": [i for i, v in enumerate(many) if v is None],
                          "fixed": list(getattr(value, "fixed", ())), "watched": watched,
                          "one": not isinstance(value, tuple)}
                if told:
                    header["shapes"] = told
                self.sends.append(pipe.pp.isend(header, dst, tag=tag))
                parts = [v for v in many if v is not None]
            for v in parts:
                if getattr(v, "_tp_meta", None) is not None:   # (a watched colwise output:
                    v = v.as_subclass(sys.modules["torch"].Tensor)  # its data alone)
                self.sends.append(pipe.pp.isend(v, dst, tag=tag))
            return "s"
        elif a.kind in (RECV_F, RECV_B):
            told = None
            try:
                value = self.recvs.pop(a).wait(pipe.timeout)
                if isinstance(value, dict) and _PARTS in value:
                    told = value.get("shapes")
                    value = self._parts(a, value)
            except MeshError as e:
                raise _in_action(e, self._receiving(a)) from None
            if told is not None and pipe.reshaped is not None:
                pipe.reshaped.follow(told)      # (before this stage's first forward)
            (self.xs if a.kind == RECV_F else self.gys)[_key(a)] = value
            return "f"
        elif a.kind == AR:
            assert pipe.dp is not None       # the lowering adds ARs only with a dp axis
            works = self.syncs.setdefault(a.stage, [])
            # (ZeRO stage 2: a gradient one replica keeps reduced to it, engine.zero_grads)
            roots = pipe.owned.roots(a.stage) if pipe.owned else itertools.repeat(None)
            # (a torch stage's in a 16-bit wire dtype where one is set: DeepSpeed's
            # communication_data_type, engine.grad_wire)
            wire = pipe.grad_wire
            for g, root in zip(pipe.stages[a.stage].grads(), roots):
                works.append(
                    post(pipe.dp, g, wire, root) if wired(g, wire) else
                    collectives.all_reduce(pipe.dp, g, op="avg", async_op=True) if root is None
                    else collectives.reduce(pipe.dp, g, root=root, op="avg", async_op=True))
        elif a.kind == OPT:
            self._finish_sync(a.stage)
            self._add_prior(a.stage)
            assert pipe.optimizer is not None
            if not self.opted:      # the step's first OPT: every stage's weights before it
                self.stepped = {s: [copied(p) for p in st.params()]
                                for s, st in pipe.stages.items()}
                if hasattr(pipe.optimizer, "state_dict"):
                    self.opt_state = copy.deepcopy(pipe.optimizer.state_dict())
            self.opted.add(a.stage)
            pipe.optimizer(pipe.stages[a.stage])
            self._stepped_alone(a)
        return ""

    def _stepped_alone(self, a: Action) -> None:
        """Raise where ``optimizer(stage)`` at OPT action ``a`` changed the
        weights of another stage of this rank whose own OPT comes later (one
        torch optimizer over all the rank's parameters, ``opt.step()`` at
        each call): a rank holding several stages (interleaved, ZB-V) would
        step them once per stage a step, silently."""
        pipe = self.pipe
        later = {b.stage for b in pipe.program if b.kind == OPT} - self.opted
        for s in sorted(later):
            if any(not bool(((p == o) | (o != o)).all())          # (a NaN is no change)
                   for p, o in zip(pipe.stages[s].params(), self.stepped[s])):
                raise ValueError(
                    f"pp rank {pipe.rank}: pipeline step {self.n} ({pipe.schedule.name}), "
                    f"{a}: optimizer(stage {a.stage}) changed the weights of stage {s} too, "
                    f"whose own OPT action comes later in the step, so they would be stepped "
                    f"once per stage of this rank: an optimizer= steps the parameters of the "
                    f"stage it is given only (a torch optimizer per stage)")

    def _computing(self, a: Action, given: Any) -> str:
        """What compute action ``a`` was doing, in the user's terms: a
        note on an error raised in it (a stage's own numpy error, a shape
        mismatch, named neither the stage nor where its input came from)."""
        pipe, sched = self.pipe, self.pipe.schedule
        call = {F: "forward", B: "backward", I: "backward_input", W: "backward_weight"}[a.kind]
        text = (f"pp rank {pipe.rank}: raised in pipeline step {self.n} ({sched.name}), {a}: "
                f"stage {a.stage}'s {call}() of micro-batch {a.mb}")
        if given is not None:
            text += f", its input of shape {given}"
            if a.stage > 0 and sched.rank_of(a.stage - 1) != pipe.rank:
                text += (f" from stage {a.stage - 1} on pp rank "
                         f"{sched.rank_of(a.stage - 1)}")
        return text

    def _receiving(self, a: Action) -> str:
        """What receive ``a`` waits for, in the user's terms (for errors)."""
        sched = self.pipe.schedule
        _, src, dst, mb = message_key(a)
        what = "activation" if a.kind == RECV_F else "gradient"
        return (f"pipeline step {self.n} ({sched.name}), {a}: stage {dst} waits for stage "
                f"{src}'s {what} of micro-batch {mb} from pp rank {sched.rank_of(src)}")

    def _parts(self, a: Action, header: dict[str, Any]) -> tuple[Any, ...]:
        """The tuple a header announced: its parts follow it on the same
        tag (in order: one source, one tag), None where the sender had none;
        its colwise outputs watched again (``watched``), and a tensor sent
        alone beside its watch returned alone (``one``)."""
        pipe = self.pipe
        src, tag = pipe.schedule.rank_of(message_key(a)[1]), pipe._tag(a, self.n)
        none = set(header["none"])
        reqs = {i: pipe.pp.irecv(src, tag=tag) for i in range(header[_PARTS]) if i not in none}
        parts: list[Any] = [None] * header[_PARTS]
        try:
            for i, req in reqs.items():
                parts[i] = req.wait(pipe.timeout)
        except BaseException:
            for req in reqs.values():
                req.cancel()
            raise
        for i, watch in header.get("watched", ()):
            if pipe.tp is not None:        # (the sender's tp peers are this rank's own)
                parts[i] = rewatched(parts[i], watch, pipe.tp)
        if header.get("one"):
            return parts[0]
        return Parts(parts, header.get("fixed", ()))

    def _forward(self, a: Action) -> None:
        pipe, (s, k) = self.pipe, _key(a)
        last = s == pipe.schedule.num_stages - 1
        if last:
            forget_exits()
        x = self.xs.pop((s, k))
        # (taken once: what its input gradient must be, checked in _backward, and what
        # an error in the forward notes)
        self.in_shapes[(s, k)] = _shapes(x)
        if self.forward_only:
            y = _forward_only(pipe.stages[s], x)
        else:
            y, self.ctxs[(s, k)] = pipe.stages[s].forward(x)
        split = split_by() if last else None
        if split is not None:
            self._split_output(a, *split)
        if last and self.forward_only:
            self.outs_last[k] = y
            if self.targets:
                self.losses[k] = self._value(a, y, self.targets[k])
        elif last:
            seed = self.scaled.seed(self.weights[k])
            out = self._loss(y, self.targets[k], seed, self.scaled.sum_seed())
            loss, gy = out[0], out[1]
            counted = self._counted(a, *count_reports(out))
            if seed is not None:
                gy = self.scaled.seeded(gy, seed, counted, pipe.loss_fn)
            if _shapes(y) is not None and not _fits(_shapes(gy), _shapes(y)):
                # (numpy broadcasts a (rows, 1) one through a Tanh's backward: wrong
                # gradients with nothing said; other shapes failed far off, in a stage)
                raise ValueError(f"pp rank {pipe.rank}: pipeline step {self.n} "
                                 f"({pipe.schedule.name}), {a}: loss_fn(output, target) "
                                 f"returned a gradient of shape {_shapes(gy)} for an output of "
                                 f"shape {_shapes(y)} (micro-batch {k}): the gradient of the "
                                 "loss with respect to the output has the output's shape")
            self.losses[k] = float(loss)
            # (a per-token loss's sum goes back as it is: settle() scales the gradients)
            self.gys[(s, k)] = gy if counted or seed is not None else gy * self.weights[k]
        elif pipe.schedule.rank_of(s + 1) == pipe.rank:
            self.xs[(s + 1, k)] = y
        else:
            self.outs[(s, k)] = y

    def _split_output(self, a: Action, name: str, style: str) -> None:
        """Refuse a last stage whose output a tensor-parallel plan left split
        along the sequence: the loss would take each tp rank's part of the
        sequence against the whole target (a shape error, or, a loss pooling
        over the sequence, another loss on each rank and replicated weights
        drifting apart with nothing said). The step fails on every rank."""
        pipe = self.pipe
        where = f" (tp rank {pipe.tp.rank})" if pipe.tp is not None else ""
        # (a "replicate" module's output is whole only when its input was gathered)
        whole = ("" if style == "replicate" else
                 f"give {name!r} output 'replicate' in the plan, or ")
        raise PlanError(f"pp rank {pipe.rank}{where}: the last stage's output is split along "
                        f"the sequence over the tp group by {name!r} (output 'sequence' in the "
                        f"plan; pipeline step {self.n} ({pipe.schedule.name}), {a}), so the "
                        f"loss would see this tp rank's part of the sequence: {whole}plan a "
                        f"colwise module after it with input 'sequence' and output "
                        f"'replicate' (the head)")

    def _loss(self, y: Any, target: Any, seed: float | None = None,
              sum_seed: float | None = None) -> tuple[Any, Any]:
        """``loss_fn(y, target)``: (loss, gradient of ``y``); on its first
        call, a torch loss is wrapped or a wrong return refused, the loss
        called once (a function of the user's on a torch output: engine.
        torch_stage's ``first_loss``; a loss scale's seed in that call). A tensor
        output's loss gets its targets as tensors on the output's device
        (each part of a tuple), on its first call too: a torch loss of the
        user's own (``F.cross_entropy(logits, y)``) given numpy targets
        failed there, in torch, before it could be wrapped. With a loss
        scale's ``seed`` (engine.scaled), a torch loss's backward starts
        from it, or, where the loss is per-token, from ``sum_seed``."""
        pipe = self.pipe
        assert pipe.loss_fn is not None
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(y, torch.Tensor):
            target = torch_targets(target, y.device)

        def call(fn: Any) -> Any:       # (seeded where a loss scale seeds a torch loss)
            if seed is not None and getattr(fn, "seeded", False):
                return fn(y, target, seed=seed, sum_seed=sum_seed)
            return fn(y, target)

        if not pipe.loss_checked and pipe.has_opt:
            # (a mean cross entropy run per token: too late for OPT; chosen before the first
            # call, so a loss_fn set since the Pipeline was made is called once there too)
            pipe.loss_fn = getattr(pipe.loss_fn, "as_written", pipe.loss_fn)
        if not pipe.loss_checked and not getattr(pipe.loss_fn, "seeded", False) and \
                torch is not None and isinstance(y, torch.Tensor):    # (called once)
            pipe.loss_fn, out = first_loss(pipe.loss_fn, y, target, f"pp rank {pipe.rank}",
                                           pipe.has_opt, seed, sum_seed)
            pipe.loss_checked = True
            return out
        out = call(pipe.loss_fn)
        if not pipe.loss_checked:   # its first call: a torch loss wrapped, or a clear error
            fn = as_pipeline_loss(pipe.loss_fn, out, f"pp rank {pipe.rank}", y)
            if pipe.has_opt:
                fn = getattr(fn, "as_written", fn)
            if fn is not pipe.loss_fn:
                pipe.loss_fn = fn
                out = call(fn)
            pipe.loss_checked = True
        return out

    def _value(self, a: Action, y: Any, target: Any) -> float:
        """The loss alone (eval_step): a torch loss computed without its
        gradient where the loss is one (``torch_loss``'s ``value``), else
        the pair's loss (autograd on, for its gradient's sake); a per-token
        loss's sum, its count noted."""
        value = getattr(self.pipe.loss_fn, "value", None)
        if value is not None:
            out = value(y, target)
            loss, count, reports = (*out, None)[:3] if isinstance(out, tuple) else (out, None, None)
        else:
            torch = sys.modules.get("torch")
            with torch.enable_grad() if torch is not None else contextlib.nullcontext():
                out = self._loss(y, target)
            loss, (count, reports) = out[0], count_reports(out)
        self._counted(a, count, reports)
        return float(loss)

    def _counted(self, a: Action, count: Any, reports: Any = None) -> bool:
        """Note micro-batch ``a.mb``'s loss (``Counts.note``): a per-token
        loss's count (and its reports), or a mean (``count`` None); True for
        a per-token one."""
        pipe = self.pipe
        assert a.mb is not None
        where = f"pp rank {pipe.rank}: pipeline step {self.n} ({pipe.schedule.name}), {a}"
        return self.counts.note(a.mb, count, where, pipe.has_opt and not self.forward_only,
                                reports)

    def _backward(self, a: Action) -> None:
        pipe, (s, k) = self.pipe, _key(a)
        stage, ctx, gy = pipe.stages[s], self.ctxs.pop((s, k)), self.gys.pop((s, k))
        if a.kind == B:
            gx = stage.backward(ctx, gy)
        else:
            gx, self.wctxs[(s, k)] = stage.backward_input(ctx, gy)
        want = self.in_shapes.pop((s, k), None)
        if s > 0 and want is not None and gx is not None and not _fits(_shapes(gx), want):
            # (else numpy broadcast it through the stage before: a (rows, 1) one into a
            # Tanh's backward gave wrong gradients with nothing said; others failed
            # there, the stage before blamed)
            raise ValueError(f"pp rank {pipe.rank}: pipeline step {self.n} "
                             f"({pipe.schedule.name}), {a}: stage {s}'s "
                             f"{'backward' if a.kind == B else 'backward_input'}() returned an "
                             f"input gradient of shape {_shapes(gx)} for micro-batch {k}, whose "
                             f"input had shape {want}: a stage's input gradient has its "
                             "input's shape")
        if s > 0 and pipe.schedule.rank_of(s - 1) == pipe.rank:
            self.gys[(s - 1, k)] = gx
        elif s > 0:
            self.outs[(s, k)] = gx

    def _snapshot(self) -> dict[int, list[Any]]:
        """What each gradient held before the step: a copy, or None for
        zeros (what a failed step's gradients are put back to)."""
        return {s: stage.held_grads() if hasattr(stage, "held_grads") else
                [copied(g) if bool(g.any()) else None for g in stage.grads()]
                for s, stage in self.pipe.stages.items()}

    def _save_prior(self) -> dict[int, list[Any]]:
        """Set aside what the gradients held before the step (when anything:
        accumulation, or no ``zero_grad()``) and zero them, so everything
        the step does to them (the average over dp, the sum of a tied
        parameter's copies, the sequence-parallel sum over tp) covers this
        step's gradients only; ``_add_prior`` adds it back once, after.
        (Each of those, done over gradients that held the old ones, would
        count them again: a tied copy's twice, a sequence-parallel norm's
        tp + 1 times.)"""
        prior = {s: old for s, old in self.before.items() if any(o is not None for o in old)}
        for s in prior:
            for g in self.pipe.stages[s].grads():
                g[...] = 0
        return prior

    def _finish_sync(self, s: int) -> None:
        for req in self.syncs.get(s, []):    # kept until all are done: see abandon()
            req.wait()
        self.syncs.pop(s, None)

    def _add_prior(self, s: int) -> None:
        """Stage ``s``'s gradients: what they held before the step plus the
        step's, as torch's ``.grad +=`` makes them."""
        for g, old in zip(self.pipe.stages[s].grads(), self.prior.pop(s, [])):
            if old is not None:
                g += old

    def finish(self) -> None:
        """Wait for every all-reduce and every send of the step, then sum
        the gradients of tied parameters over their copies, and those of
        whole parameters fed a part of the sequence over the tp group
        (``settle`` ends the step once the ranks have agreed)."""
        for s in list(self.syncs):
            self._finish_sync(s)
        for req in self.sends:
            req.wait(self.pipe.timeout)
        if self.forward_only:
            return
        self.pipe.tied.reduce(self.pipe.timeout, self.pipe.owned_params.elsewhere)
        self.pipe.tp_sums.settle(self.pipe.timeout)

    def mean_loss(self) -> float:
        """This replica's share of the step's loss (``share``; their mean
        over dp is the step's loss): its micro-batches' means weighed by
        rows (times its share of the global batch's rows), or a per-token
        loss's sum."""
        if self.counts.kind():
            return sum(self.losses)
        return sum(w * v for w, v in zip(self.weights, self.losses))

    def settle(self, loss: float | None) -> float | None:
        """End a step every rank agreed succeeded (``agree``, which told
        each whether its loss was per-token and the count over every
        replica): a per-token step's gradients (after the dp average, the
        tied and sequence-parallel sums, all linear) and ``loss`` (the dp
        average of the replicas' sums) scaled by dp / the count, which
        makes them the sum over every token over the count (a count of 0:
        zeros); then what the gradients held before the step added back,
        and the gradients other dp replicas keep freed (ZeRO stage 2:
        engine.zero_grads). Returns the step's loss."""
        pipe = self.pipe
        if self.counts.per_token:
            scale = self.counts.scale(pipe.dp.size if pipe.dp is not None else 1)
            if not self.forward_only:
                # (under a loss scale, the sums' seed was scaled down by its divisor too)
                factor = scale * self.scaled.factor()
                for stage in pipe.stages.values():
                    # (a None .grad, a parameter the step did not reach, stays None)
                    held = stage.kept_grads() if hasattr(stage, "kept_grads") else stage.grads()
                    for g in held:
                        if g is not None:
                            g *= factor
            loss = None if loss is None else loss * scale
        if self.forward_only:
            return loss
        for s in list(self.prior):
            self._add_prior(s)
        pipe.owned.free()      # (ZeRO stage 2: the other replicas' shares' gradients)
        self.scaled.settle(pipe)    # (a loss scale: a rank's overflow told to every rank)
        return loss
