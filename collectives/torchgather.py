"""The "meshrun" ProcessGroup's (collectives.torchpg) rooted collectives,
all_gather in its forms, and the barriers.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

import mesh
from mesh import tensors as _tensors

from . import api as C
from .host.paths import all_gather as _host_all_gather
from .host.paths import all_gather_v as _host_all_gather_v
from .host.paths import gather as _host_gather
from .host.paths import monitored_barrier as _monitored_barrier
from .host.paths import scatter as _host_scatter
from .shm.tiny import all_gather as _tiny_all_gather
from .shm.tiny import gather as _tiny_gather
from .shm.tiny import scatter as _tiny_scatter
from .runner import named
from .torchargs import (_Members, _SUM, _dtypes, _factor, _host, _joinable, _nested, _np, _op,
                        _short, _timeout_only, _views, _write)
from .torchwork import _done, _Later


class _Gathers(_Members):
    """ProcessGroupMeshrun's broadcast, reduce, allgather (its _v, coalesced and
    into-tensor forms), gather, scatter, barrier and monitored_barrier."""

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None,
                  timeout: Any = None) -> dist.Work:
        if isinstance(tensors, torch.Tensor):       # pg.broadcast(tensor, root): _short
            tensors, opts = [tensors], _short(c10d.BroadcastOptions, timeout, rootRank=opts)
        opts = opts or c10d.BroadcastOptions()
        limit, secs = self._limits(opts)
        root = opts.rootRank
        return self._run([lambda a, t=t: C.broadcast(self.comm, t, root=root, async_op=a,
                                                      timeout=secs)
                          for t in tensors], None, tensors, opts.asyncOp, limit)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None, op: Any = _SUM,
               timeout: Any = None) -> dist.Work:
        if isinstance(tensors, torch.Tensor):       # pg.reduce(tensor, root, op): _short
            tensors, opts = [tensors], _short(c10d.ReduceOptions, timeout, rootRank=opts,
                                              reduceOp=op)
        opts = opts or c10d.ReduceOptions()
        limit, secs = self._limits(opts)
        name, factor = _op(opts.reduceOp)
        root = opts.rootRank
        if problem := self._premul_problem(factor, tensors):
            return self._refuse("reduce", problem, opts.asyncOp, len(tensors))
        ins = tensors
        if factor is not None:
            # the root's tensor takes the result, so it may be scaled in place; the others'
            # are inputs only, left as they were (as by every other op, and by NCCL's
            # PREMUL_SUM): a copy of theirs is scaled
            f = _factor(factor)
            if self.comm.rank == root:
                for t in tensors:
                    t.detach().mul_(f)
            else:
                ins = [t.detach() * f for t in tensors]
        return self._run([lambda a, t=t: C.reduce(self.comm, t, root=root, op=name, async_op=a,
                                                   timeout=secs)
                          for t in ins], None, tensors, opts.asyncOp, limit)

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        if isinstance(input_tensors, torch.Tensor):     # pg.allgather(outputs, input): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
        opts = _timeout_only(opts, c10d.AllgatherOptions) or c10d.AllgatherOptions()
        limit, secs = self._limits(opts)
        for outs in output_tensors:
            if len(outs) != self._n:
                return self._refuse("all_gather", f"its output list holds {len(outs)} "
                                    f"tensors, one for each of {self._n} ranks needed",
                                    opts.asyncOp, len(input_tensors))
        if any(len({o.shape for o in outs}) > 1 or outs[0].numel() != x.numel()
               for outs, x in zip(output_tensors, input_tensors)):
            return self._allgather_v(output_tensors, input_tensors, opts)

        views = [_views(x, outs, (self._n,) + tuple(x.shape), self.comm.rank)
                 for outs, x in zip(output_tensors, input_tensors)]
        if not opts.asyncOp and len(views) == 1 and views[0] is not None and self._tiny_rows(
                views[0], output_tensors[0], secs, limit):
            return _done(_nested(output_tensors))

        def finish(values: list[Any]) -> None:
            for outs, value, v in zip(output_tensors, values, views):
                for j, o in enumerate(outs):
                    if v is None:
                        _write(o, value[j])
                    else:       # (written through numpy: autograd is told)
                        _tensors.written(o)
        return self._run([lambda a, x=x, v=v: C.all_gather(self.comm, x, async_op=a,
                                                            timeout=secs)
                          if v is None else _host_all_gather(self.comm, v[0], async_op=a,
                                                             timeout=secs, out=v[1])
                          for x, v in zip(input_tensors, views)], finish,
                         _nested(output_tensors), opts.asyncOp, limit)

    def _tiny_rows(self, view: tuple[Any, list[Any]], outs: list[torch.Tensor], secs: float,
                   limit: float | None) -> bool:
        """Whether a blocking all_gather of one input into the list ``outs``
        (``view``: _views's, the input's numpy view and the outputs') ran
        the short way (collectives.shm.tiny, as all_gather_into_tensor and
        collectives.all_gather take it), its rows copied into ``outs``;
        False: nothing done, no tag taken. The list's outputs are apart from
        each other, so its rows come back in one array of their own."""
        rows = self._quick(lambda: _tiny_all_gather(self.comm, view[0], secs), secs, limit)
        if rows is None:
            return False
        for o, dest, row in zip(outs, view[1], rows):
            dest[...] = row
            _tensors.written(o)     # (written through numpy: autograd is told)
        return True

    def _allgather_v(self, output_tensors: list[list[torch.Tensor]],
                     input_tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        """all_gather where the ranks' tensors differ in size (output j takes
        rank j's, whatever its size; gloo refuses these): all_gather_v of
        the inputs flattened, the outputs' sizes its counts (the ring, or
        the same-host board, straight into the outputs: it sent every
        rank's input to each by an uneven all_to_all of n copies of it,
        2.4-3.2x the time at 16 MiB, and at 2 ranks 162 MiB more at its
        peak for 32 MiB a rank). Outputs whose sizes differ between ranks raise
        MismatchError on every rank, naming both ranks' sizes; an input
        that is not its own output's size too, naming both sizes."""
        limit, secs = self._limits(opts)
        launches, finishes = [], []
        for outs, x in zip(output_tensors, input_tensors):
            arr = _host(x.detach().reshape(-1), self._what("all_gather"))
            sizes = [o.numel() for o in outs]
            views = [_np(o) for o in outs]     # (written straight where they can be)
            straight = None if any(v is None for v in views) else views
            launches.append(lambda a, arr=arr, sizes=sizes, straight=straight: _host_all_gather_v(
                self.comm, arr, sizes, a, secs, name="all_gather", out=straight,
                check=self._fits(sizes[self.comm.rank], arr.size, "all_gather",
                                 "its output tensor for this rank vs its input")))
            finishes.append((outs, sizes))

        def finish(values: list[Any]) -> None:
            for (outs, sizes), value in zip(finishes, values):
                if isinstance(value, list):     # (written through numpy: autograd is told)
                    for o in outs:
                        _tensors.written(o)
                    continue
                got = _tensors.to_torch(value, outs[0]).split(sizes)
                for o, piece in zip(outs, got):
                    _write(o, piece)
        return self._run(launches, finish, _nested(output_tensors), opts.asyncOp, limit)

    def _fits(self, want: int, got: int, name: str, sizes: str) -> Callable[[], None]:
        """An uneven all_gather's or reduce_scatter's check (run in the call,
        failing it on every rank): this rank's own part is ``want`` elements
        where its input holds ``got``."""
        def check() -> None:
            if want != got:
                me = self.comm.rank
                raise mesh.MismatchError(
                    f"rank {self.comm.ranks[me]}: {name} on group {self.comm.name}: "
                    f"{named(self.comm, me)} expects {want} rows from rank {me} (itself), "
                    f"which sends {got} ({sizes})")
        return check

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            input_list: list[torch.Tensor], opts: Any = None) -> dist.Work:
        """output_lists[rank][j] receives that rank's input_list[j] (allgather's
        outputs transposed)."""
        return self.allgather([list(outs) for outs in zip(*output_lists)], input_list, opts)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor,
                        opts: Any = None) -> dist.Work:
        """all_gather_into_tensor; its future holds what gloo's holds: the
        output's rows, one view per rank (``output.chunk``), where they have
        the input's shape (gloo takes no other output), else [output]."""
        n = self._n

        def rows() -> list[torch.Tensor]:     # (made once the Work's result is asked for)
            views = list(output.chunk(n)) if output.dim() and output.shape[0] else []
            return views if len(views) == n and all(
                p.shape == input.shape for p in views) else [output]
        return self.allgather_into_tensor_coalesced([output], [input], opts, _Later(rows))

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor],
                                        inputs: list[torch.Tensor],
                                        opts: Any = None, result: Any = None) -> dist.Work:
        opts = opts or c10d.AllgatherOptions()
        limit, secs = self._limits(opts)
        joined = _joinable(inputs)      # (one collective, else one a tensor: its refusal too)
        if failed := self._unjoined("all_gather_into_tensor", inputs, opts.asyncOp):
            return failed
        for o, x in zip(outputs, inputs):
            if o.dtype != x.dtype:
                return self._refuse("all_gather_into_tensor", _dtypes(o, x), opts.asyncOp,
                                    1 if joined else len(inputs))
            if o.numel() != x.numel() * self._n:
                return self._refuse("all_gather_into_tensor", f"its output holds {o.numel()} "
                                    f"elements, where {self._n} ranks' inputs of {x.numel()} "
                                    f"make {x.numel() * self._n}", opts.asyncOp,
                                    1 if joined else len(inputs))
        if joined:      # one all_gather of the inputs joined; each output takes its columns
            sizes = [x.numel() for x in inputs]
            flat = torch.cat([x.detach().reshape(-1) for x in inputs])

            def apart(values: list[Any]) -> None:
                rows = values[0].reshape(self._n, -1)
                for o, part in zip(outputs, rows.split(sizes, dim=1)):
                    _write(o, part)
            return self._run([lambda a: C.all_gather(self.comm, flat, async_op=a,
                                                     timeout=secs)],
                             apart, outputs if result is None else result, opts.asyncOp, limit)

        if not opts.asyncOp and len(inputs) == 1 and self._tiny(
                lambda x, out: _tiny_all_gather(self.comm, x, secs, out),
                inputs[0], outputs[0], secs, limit):
            return _done(outputs if result is None else result)
        views = [_views(x, o, (self._n,) + tuple(x.shape), self.comm.rank)
                 for o, x in zip(outputs, inputs)]

        def finish(values: list[Any]) -> None:
            for o, value, v in zip(outputs, values, views):
                if v is None:
                    _write(o, value)
                else:           # (written through numpy: autograd is told, as copy_ tells it)
                    _tensors.written(o)
        return self._run([lambda a, x=x, v=v: C.all_gather(self.comm, x, async_op=a,
                                                            timeout=secs)
                          if v is None else _host_all_gather(self.comm, v[0], async_op=a,
                                                             timeout=secs, out=v[1])
                          for x, v in zip(inputs, views)], finish,
                         outputs if result is None else result, opts.asyncOp, limit)

    def gather(self, output_tensors: list[list[torch.Tensor]],
               input_tensors: list[torch.Tensor], opts: Any = None,
               timeout: Any = None) -> dist.Work:
        if isinstance(input_tensors, torch.Tensor):     # pg.gather(outputs, input, root): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
            opts = _short(c10d.GatherOptions, timeout, rootRank=opts)
        opts = opts or c10d.GatherOptions()
        limit, secs = self._limits(opts)
        root = opts.rootRank
        x = input_tensors[0]
        if self.comm.rank == root and (len(output_tensors[0]) != self._n or any(
                o.numel() != x.numel() for o in output_tensors[0])):
            return self._refuse("gather", f"the root's {len(output_tensors[0])} output tensors "
                                f"of {[o.numel() for o in output_tensors[0]]} elements cannot "
                                f"take {self._n} ranks' inputs of {x.numel()}", opts.asyncOp)

        v = _views(x, output_tensors[0], (self._n,) + tuple(x.shape), root) \
            if self.comm.rank == root else None

        def finish(values: list[Any]) -> None:
            if v is not None:
                for o in output_tensors[0]:
                    _tensors.written(o)
            elif values[0] is not None:
                for j, o in enumerate(output_tensors[0]):
                    _write(o, values[0][j])
        xa = None if opts.asyncOp or v is None and self.comm.rank == root else _np(x)
        if xa is not None and self._quick(lambda: _tiny_gather(
                self.comm, xa, root, secs, None if v is None else v[1]), secs, limit) is not None:
            finish([None])      # (the short way, collectives.shm.tiny: straight into v's)
            return _done(_nested(output_tensors))
        return self._run([lambda a: C.gather(self.comm, x, root=root, async_op=a,
                                             timeout=secs) if v is None
                          else _host_gather(self.comm, v[0], root, a, secs, out=v[1])],
                         finish, _nested(output_tensors), opts.asyncOp, limit)

    def scatter(self, output_tensors: list[torch.Tensor],
                input_tensors: list[list[torch.Tensor]], opts: Any = None,
                timeout: Any = None) -> dist.Work:
        """The root scatters its stacked inputs; elsewhere the output tensor
        passed says the dtype and device the row comes back as."""
        if isinstance(output_tensors, torch.Tensor):    # pg.scatter(out, inputs, root): _short
            output_tensors, input_tensors = [output_tensors], [input_tensors]
            opts = _short(c10d.ScatterOptions, timeout, rootRank=opts)
        opts = opts or c10d.ScatterOptions()
        limit, secs = self._limits(opts)
        root = opts.rootRank
        out = output_tensors[0]
        if self.comm.rank == root and (len(input_tensors[0]) != self._n or any(
                x.shape != input_tensors[0][0].shape for x in input_tensors[0])
                or input_tensors[0][0].numel() != out.numel()):
            return self._refuse("scatter", f"the root's {len(input_tensors[0])} inputs of "
                                f"{[x.numel() for x in input_tensors[0]]} elements are not "
                                f"{self._n} of its output's {out.numel()}", opts.asyncOp)
        mine = self.comm.rank == root
        src = torch.stack([x.detach() for x in input_tensors[0]]) if mine else out
        v = _views(src if mine else None, out, tuple(src.shape[1:] if mine else out.shape))
        if v is not None and not opts.asyncOp and self._quick(lambda: _tiny_scatter(
                self.comm, v[0], root, secs, v[1].dtype, tuple(out.shape), v[1]), secs,
                limit) is not None:
            _tensors.written(out)       # (the short way, collectives.shm.tiny)
            return _done(output_tensors)
        if v is not None:
            return self._run([lambda a: _host_scatter(
                self.comm, v[0], root, a, secs, v[1].dtype, tuple(out.shape), v[1])],
                             lambda _: _tensors.written(out), output_tensors, opts.asyncOp,
                             limit)
        return self._run([lambda a: C.scatter(self.comm, src, root=root, async_op=a,
                                              timeout=secs, shape=tuple(out.shape))],
                         lambda v: _write(out, v[0]), output_tensors, opts.asyncOp, limit)

    def barrier(self, opts: Any = None) -> dist.Work:
        """``dist.barrier(timeout=...)`` waits that long, as gloo's: it waited
        the group's timeout (30 minutes by default) for a rank that never came."""
        opts = opts or c10d.BarrierOptions()
        limit, secs = self._limits(opts)
        return self._run([lambda a: C.barrier(self.comm, async_op=a, timeout=secs)],
                         None, [], opts.asyncOp, limit)

    def monitored_barrier(self, timeout: timedelta | None = None,
                          wait_all_ranks: bool = False) -> None:
        """gloo's monitored barrier, in gloo's words
        (collectives.host.paths.monitored_barrier): rank 0 names the ranks
        that did not come within ``timeout``."""
        _monitored_barrier(self.comm, self.timeout if timeout is None
                           else timeout.total_seconds(), wait_all_ranks)

    all_gather_single = _allgather_base
    all_gather_single_coalesced = allgather_into_tensor_coalesced
