"""The "meshrun" ProcessGroup's (collectives.torchpg) reduce_scatter and
all_to_all in their forms (_v, coalesced, into a tensor, single).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from mesh import tensors as _tensors

from . import api as C
from .host.paths import _apart, _into
from .host.paths import all_to_all as _host_all_to_all
from .host.paths import all_to_all_v as _all_to_all_v
from .host.paths import reduce_scatter as _host_reduce_scatter
from .host.paths import reduce_scatter_v as _host_reduce_scatter_v
from .shm.tiny import all_to_all as _tiny_all_to_all
from .shm.tiny import reduce_scatter as _tiny_reduce_scatter
from .torchargs import (_Members, _SUM, _dtypes, _factor, _host, _joinable, _np, _op, _short,
                        _timeout_only, _views, _write)
from .torchwork import _done


class _Exchanges(_Members):
    """ProcessGroupMeshrun's reduce_scatter and alltoall calls."""

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None,
                       timeout: Any = None) -> dist.Work:
        if isinstance(output_tensors, torch.Tensor):    # pg.reduce_scatter(out, ins, op): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
            opts = _short(c10d.ReduceScatterOptions, timeout,
                          reduceOp=_SUM if opts is None else opts)
        opts = opts or c10d.ReduceScatterOptions()
        for ins in input_tensors:
            if len(ins) != self._n:
                return self._refuse("reduce_scatter", f"its input list holds {len(ins)} "
                                    f"tensors, one for each of {self._n} ranks needed",
                                    opts.asyncOp, len(input_tensors))
        if any(len({x.shape for x in ins}) > 1 or o.numel() != ins[0].numel()
               for o, ins in zip(output_tensors, input_tensors)):
            return self._reduce_scatter_v(output_tensors, input_tensors, opts)
        return self._reduce_scatter(output_tensors, [torch.stack([x.detach() for x in ins])
                                                     for ins in input_tensors], opts, True)

    def _reduce_scatter_v(self, output_tensors: list[torch.Tensor],
                          input_tensors: list[list[torch.Tensor]], opts: Any) -> dist.Work:
        """reduce_scatter where rank j's part differs in size from the others'
        (as gloo allows): reduce_scatter_v of the parts, their sizes its
        counts (on the same-host board each rank's part is reduced out of
        the peers' parts where they lie; over sockets they are joined for
        the ring; it was an uneven all_to_all and each rank combining the
        parts it received), with
        the collectives' own ops (bfloat16, and float16 averaged, widened
        to float32 and rounded once, as collectives.tensors and
        collectives.api do). Part sizes that differ between ranks raise
        MismatchError on every rank naming both ranks' sizes; an output
        that is not this rank's part's size, or an op its dtype cannot
        take, raises on every rank."""
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        what = self._what("reduce_scatter")
        launches, finishes = [], []
        for out, ins in zip(output_tensors, input_tensors):
            # the parts as they are (views of CPU tensors of one dtype): the board reduces
            # each rank's part out of the peers' without a joined copy of the input
            apart = len({x.dtype for x in ins}) == 1
            pieces = [x.detach().reshape(-1) for x in ins] if apart else \
                [torch.cat([x.detach().reshape(-1) for x in ins])]
            if factor is not None:
                pieces = [x * _factor(factor) for x in pieces]
            arrs = [_tensors.operand(x if x.is_cpu else x.cpu(), what, True)[0] for x in pieces]
            if name == "avg" and pieces[0].dtype == torch.float16:
                # averaged in float32 and rounded once, as collectives.api averages
                # float16 (its partial sums overflowed: three ranks' 30000 gave inf where
                # even parts gave 30000); the fingerprint still says float16
                arrs = [x.astype(C._HALF_WIDE) for x in arrs]
            sizes = [x.numel() for x in ins]
            v = _views(None, out, (out.numel(),))   # (written straight where it can be)
            straight = None if v is None else v[1]
            launches.append(lambda a, arrs=arrs, sizes=sizes, k=out.numel(), apart=apart,
                            straight=straight: _host_reduce_scatter_v(
                self.comm, None if apart else arrs[0], sizes, name, a, secs,
                name="reduce_scatter", parts=arrs if apart else None, out=straight,
                check=self._fits(k, sizes[self.comm.rank], "reduce_scatter",
                                 "its output vs that rank's input for it")))
            finishes.append((out, straight))

        def finish(values: list[Any]) -> None:
            for (out, straight), value in zip(finishes, values):
                if straight is not None and value.size and \
                        value.ctypes.data == straight.ctypes.data:
                    _tensors.written(out)   # (written through numpy: autograd is told)
                else:
                    _write(out, _tensors.to_torch(value, out))
        return self._run(launches, finish, output_tensors, opts.asyncOp, limit)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor,
                             opts: Any = None) -> dist.Work:
        return self.reduce_scatter_tensor_coalesced([output], [input], opts)

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None) -> dist.Work:
        opts = opts or c10d.ReduceScatterOptions()
        if failed := self._unjoined("reduce_scatter_tensor", inputs, opts.asyncOp):
            return failed
        for o, x in zip(outputs, inputs):
            if o.dtype != x.dtype:
                return self._refuse("reduce_scatter_tensor", _dtypes(o, x), opts.asyncOp,
                                    1 if _joinable(inputs) else len(inputs))
            if x.numel() != o.numel() * self._n:
                return self._refuse("reduce_scatter_tensor", f"its input holds {x.numel()} "
                                    f"elements, where {self._n} ranks' outputs of {o.numel()} "
                                    f"take {o.numel() * self._n}", opts.asyncOp,
                                    1 if _joinable(inputs) else len(inputs))
        if _joinable(inputs):   # one reduce_scatter of the inputs joined (rank j's columns)
            joined = torch.cat([x.detach().reshape(self._n, -1) for x in inputs], dim=1)
            return self._reduce_scatter([joined.new_empty(joined.shape[1])], [joined], opts,
                                        True, outputs)
        return self._reduce_scatter(outputs, [x.detach().reshape(self._n, -1) for x in inputs],
                                    opts, False)

    def _reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                        opts: Any, own: bool,
                        parts: list[torch.Tensor] | None = None) -> dist.Work:
        """``inputs`` shaped (group size, ...); ``own``: they are copies made
        here, which a PREMUL_SUM factor may scale in place. ``parts``: the
        caller's outputs, which the one output (a temporary) is split into."""
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        if problem := self._premul_problem(factor, inputs):
            return self._refuse("reduce_scatter", problem, opts.asyncOp, len(inputs))
        if factor is not None:
            f = _factor(factor)
            inputs = [x.mul_(f) if own else x * f for x in inputs]

        if not opts.asyncOp and len(inputs) == 1 and parts is None and not (
                name == "avg" and inputs[0].dtype == torch.float16) and self._tiny(
                lambda x, out: _tiny_reduce_scatter(self.comm, x, name, secs, out),
                inputs[0], outputs[0], secs, limit):
            return _done(outputs)
        views = [None if name == "avg" and x.dtype == torch.float16    # (in float32: api's)
                 else _views(x, o, (x.shape[0] // self._n,) + tuple(x.shape[1:]))
                 for o, x in zip(outputs, inputs)]

        def finish(values: list[Any]) -> None:
            for o, value, v in zip(outputs, values, views):
                if v is None:
                    _write(o, value)
                else:
                    _tensors.written(o)
            if parts is not None:
                for o, part in zip(parts, outputs[0].split([p.numel() for p in parts])):
                    _write(o, part)
        return self._run([lambda a, x=x, v=v: C.reduce_scatter(
            self.comm, x, op=name, async_op=a, timeout=secs) if v is None
                          else _host_reduce_scatter(self.comm, v[0], op=name, async_op=a,
                                                    timeout=secs, out=v[1])
                          for x, v in zip(inputs, views)], finish,
                         outputs if parts is None else parts, opts.asyncOp, limit)

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor,
                      output_split_sizes: list[int], input_split_sizes: list[int],
                      opts: Any = None) -> dist.Work:
        opts = _timeout_only(opts, c10d.AllToAllOptions) or c10d.AllToAllOptions()
        limit, secs = self._limits(opts)
        n = self._n
        if problem := self._a2a_output_problem(output, input, output_split_sizes,
                                               input_split_sizes):
            return self._refuse("all_to_all_single", problem, opts.asyncOp)
        if not output_split_sizes and not input_split_sizes:
            if not opts.asyncOp and output.shape == input.shape and self._tiny(
                    lambda x, out: _tiny_all_to_all(self.comm, x, secs, out), input, output,
                    secs, limit):
                return _done([output])
            if output.shape == input.shape and (
                    v := _views(input, output, tuple(input.shape))) is not None:
                return self._run([lambda a: _host_all_to_all(self.comm, v[0], async_op=a,
                                                              timeout=secs, out=v[1])],
                                 lambda _: _tensors.written(output), [output], opts.asyncOp,
                                 limit)
            return self._run([lambda a: C.all_to_all(self.comm, input, async_op=a,
                                                     timeout=secs)],
                             lambda v: _write(output, v[0]), [output], opts.asyncOp, limit)
        ins = list(input_split_sizes) or [input.shape[0] // n] * n
        outs = list(output_split_sizes) or [output.shape[0] // n] * n
        arr = _host(input, self._what("all_to_all_single"))
        return self._run([lambda a: _all_to_all_v(self.comm, arr, ins, outs, a, secs,
                                                  "output_split_sizes vs input_split_sizes",
                                                  name="all_to_all_single")],
                         lambda v: _write(output, _tensors.to_torch(v[0], output)), [output],
                         opts.asyncOp, limit)

    def _a2a_output_problem(self, output: torch.Tensor, input: torch.Tensor,
                            output_split_sizes: list[int], input_split_sizes: list[int]) -> str:
        """Why all_to_all_single's ``output`` cannot hold what this rank
        receives ('' when it can): checked before anything moves, as
        gloo's checkSplitSizes does, else the other ranks' calls succeed and
        this one fails after the transfer in torch's reshape, naming no rank.
        (The input and the splits' count and values: _all_to_all_v's own.)"""
        if input.dim() == 0:
            return ""       # (the collective's own error says it needs rows)
        if not output_split_sizes and not input_split_sizes:
            if output.numel() == input.numel():
                return ""
            return (f"its output holds {output.numel()} elements, where an even "
                    f"all_to_all_single returns as many as its input holds, {input.numel()}")
        if output_split_sizes:
            outs, how = list(output_split_sizes), f"output_split_sizes {list(output_split_sizes)}"
        else:
            outs = [output.shape[0] // self._n if output.dim() else 0] * self._n
            how = f"its output's dim 0 split evenly, {outs}"
        row = math.prod(input.shape[1:])     # (elements of a row: 1 for a 1-d input)
        if len(outs) != self._n or any(not isinstance(k, int) or k < 0 for k in outs) \
                or sum(outs) * row == output.numel():
            return ""       # (bad splits: _all_to_all_v names them)
        return (f"its output holds {output.numel()} elements, where the {sum(outs)} rows of "
                f"{row} it receives ({how}) take {sum(outs) * row}")

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist.Work:
        opts = _timeout_only(opts, c10d.AllToAllOptions) or c10d.AllToAllOptions()
        limit, secs = self._limits(opts)
        if len(output_tensors) != self._n or len(input_tensors) != self._n:
            return self._refuse("all_to_all", f"its lists hold {len(output_tensors)} output "
                                f"and {len(input_tensors)} input tensors, one for each of "
                                f"{self._n} ranks needed", opts.asyncOp)
        flat = torch.cat([x.detach().reshape(-1) for x in input_tensors])
        ins = [x.numel() for x in input_tensors]
        outs = [o.numel() for o in output_tensors]
        arr = _host(flat, self._what("all_to_all"))
        dest = _apart([None if (o := _np(t)) is None else _into(o, arr, (t.numel(),))
                       for t in output_tensors], self._n)

        def finish(values: list[Any]) -> None:
            if dest is not None:
                for o in output_tensors:
                    _tensors.written(o)
                return
            pieces = _tensors.to_torch(values[0], output_tensors[0]).split(outs)
            for o, piece in zip(output_tensors, pieces):
                _write(o, piece)
        return self._run([lambda a: _all_to_all_v(
            self.comm, arr, ins, outs, a, secs,
            "its output tensors vs the ranks' input tensors for it", name="all_to_all",
            out=dest)], finish, output_tensors, opts.asyncOp, limit)

    reduce_scatter_single = _reduce_scatter_base
    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced
    all_to_all_single = alltoall_base
