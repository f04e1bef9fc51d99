"""A pipeline step that fails: its clean-up, the ranks' agreement, the roll-back.

``_Step`` is the step engine.executor's Pipeline drives: engine.step's
``_StepActions`` (its state and its actions run) and what ends it.
``abandon`` cleans up after this rank's own failure (receives cancelled,
the step's tags aborted on the pp group, the all-reduces it will not
start abandoned on the dp group, the tp peers' next collective failed:
``_abandon_tp``); ``agree`` has every rank of the pipeline learn whether
the step failed anywhere (a rank whose part finished raises
``StepFailed``), and ``roll_back`` puts the gradients, the weights an OPT
action changed and the optimizer's state back to what they were before
the step. See engine.executor's module docstring for what a failed step
leaves behind.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

import collectives
from mesh import AbortKind, LostPeerError, MeshError

from .grad_wire import calls, wired
from .ir import AR, RECV_B, RECV_F, SEND_B, SEND_F
from .pipeline_args import _PAIRED, _paired
from .reports import width
from .step import _StepActions

__all__ = ["StepFailed"]

_REASON_MAX = 400     # abort reasons cross the wire in a header


class _Slots(NamedTuple):
    """Where each word sits in a step's agreement (``_Step.agree``), an
    all-reduce's maximum of every rank's numbers (``size`` of them)::

        0                       whether some rank's part failed
        1 ..                    each dp replica's rows of inputs and of targets (+1; 0:
                                not known here: only the first and last stages know)
        1 + 2 * replicas ..     each replica's kind of loss: (its count + 1, 0) where
                                per-token, (0, 1) a mean, (0, 0) not known here
        said                    the reports' word (engine.reports: 0, 1 or 2)
        said + 1 ..             each replica's reports' sums, ``span`` numbers each
        lo ..                   each replica's share of the loss (-inf: not known here)
        amp - 1                 1 where some rank has a share
        amp .. amp + 4          a loss scale's four slots (engine.scaled)
        size - 2, size - 1      whether some rank evaluates (eval_step), some trains
    """
    replicas: int
    said: int
    span: int
    lo: int
    amp: int
    size: int


def _slots(replicas: int, reports: int) -> _Slots:
    """The agreement's slots for ``replicas`` dp replicas whose reports are
    ``reports`` numbers each (engine.reports' ``width``)."""
    said = 1 + 4 * replicas
    span = 2 * reports
    size = 9 + 5 * replicas + span * replicas
    amp = size - 6
    return _Slots(replicas, said, span, amp - 1 - replicas, amp, size)


class _Heard(NamedTuple):
    """What a step's agreement heard that fails it (``_Step._heard``): the
    replicas whose input and target rows do not pair, the ranks that
    evaluate beside training ones, the replicas by kind of loss, why
    replicas' reports are unlike, each rank's reason (None: none), and the
    micro-batches a step takes."""
    wrong: list[tuple[int, int, int]]
    evals: list[int]
    kinds: tuple[list[int], list[int]]
    unlike: str | None
    reasons: list[str | None]
    m: int


class StepFailed(MeshError):
    """A pipeline step failed on another rank after this rank's part of it
    finished; its gradients are rolled back, as the failed ranks' are.
    Never the root cause (``from_abort``: mesh.spawn and meshrun report the
    rank that failed)."""

    from_abort = True
    __module__ = "engine.executor"     # its public home: reports and pickles name it there


class _Step(_StepActions):
    """One step on one rank as the Pipeline runs it: ``_StepActions``, and
    when it fails anywhere, its clean-up, agreement and roll-back."""

    def abandon(self, at: int, error: BaseException) -> None:
        """Clean up after ``error`` in action ``at`` (len(program): after the
        last one). Cancel the receives still posted; abort, on every pp rank,
        the tags of the messages from ``at`` on (peers waiting for one raise,
        a late one is dropped), and on the dp group the all-reduces this step
        will not start, so the group's collective sequence stays the same on
        every rank. Then let the started all-reduces finish and put back what
        the gradients held before the step."""
        pipe = self.pipe
        for req in self.recvs.values():
            req.cancel()
        self.recvs.clear()
        where = f" (tp rank {pipe.tp.rank})" if pipe.tp is not None else ""
        reason = (f"pipeline step {self.n} failed on pp rank {pipe.rank}{where}: "
                  f"{type(error).__name__}: {error}")[:_REASON_MAX]
        kind = AbortKind.of(error)  # peers raise the same kind: a lost peer stays one
        lost = error.peer if isinstance(error, LostPeerError) else None
        skipped = 1 if self.rows_pending else 0
        for a in self.program[at:]:
            if a.kind in (SEND_F, SEND_B, RECV_F, RECV_B):
                pipe.pp.collective_channel().abort(pipe._tag(a, self.n), reason, kind, lost)
            elif a.kind == AR:
                grads = pipe.stages[a.stage].grads()[len(self.syncs.get(a.stage, [])):]
                skipped += sum(calls(g, pipe.grad_wire) if wired(g, pipe.grad_wire) else 1
                               for g in grads)
        pipe.owned_params.abandon(reason, kind, lost)    # (ZeRO stage 3's gathers)
        if not self.forward_only:       # (eval_step makes no tied sums)
            pipe.tied.abandon(reason, kind, lost)
        self._abandon_tp(reason, kind, lost, own=not getattr(error, "from_abort", False)
                         and not isinstance(error, LostPeerError))
        dp = pipe.dp
        for _ in range(skipped):
            assert dp is not None
            collectives.abandon(dp, reason, kind, lost)
        limit = pipe.timeout if pipe.timeout is not None or dp is None else dp.timeout
        for s in list(self.syncs):
            for work in self.syncs.pop(s):
                try:
                    work.wait(limit)
                except Exception:
                    pass
        self.prior.clear()
        if not self.forward_only:
            pipe.tp_sums.abandon()
        self.roll_back()

    def roll_back(self) -> None:
        """Put every gradient back to what it held before the step, and
        the weights of this rank's stages, once an OPT action ran, to what
        they were before the step's first (copied there), and an optimizer with ``state_dict()`` and
        ``load_state_dict()`` (momentum, Adam's moments, a step count) to
        its state before the step's first OPT action (a deep copy taken
        there); another optimizer's own state saw one more call."""
        for s, old in self.stepped.items():
            for p, o in zip(self.pipe.stages[s].params(), old):
                p[...] = o
        if self.opt_state is not None:
            self.pipe.optimizer.load_state_dict(self.opt_state)     # type: ignore[union-attr]
        for s, old in self.before.items():
            stage = self.pipe.stages[s]
            if hasattr(stage, "put_grads"):
                stage.put_grads(old)
                continue
            for g, o in zip(stage.grads(), old):
                if o is None:
                    g[...] = 0
                else:
                    g[...] = o

    def agree(self, error: BaseException | None) -> None:
        """Every rank of the pipeline learns whether the step failed anywhere
        (a small all-reduce over the grid): a rank whose part finished
        while another's failed rolls its gradients back too, and raises
        StepFailed naming the ranks that failed (or the all-reduce's own
        error: a LostPeerError naming a rank that died). Called with this
        rank's own error (already cleaned up and rolled back), it only tells
        the rest; the caller re-raises it. Targets whose rows do not pair
        with the inputs' (``_paired``; known on other ranks) fail the step
        on every rank, rolled back, with a ValueError naming both counts; so
        does a step that some ranks ran as ``eval_step()`` and others as
        ``step()`` (their messages pair up: the training ranks' gradients
        took the evaluating ranks' forwards, whose stages learned nothing),
        naming which ranks called which. The counts of a per-token loss
        (engine.per_token), known on the last stage's ranks, meet in it too:
        every rank learns (``counts``) whether the step's loss was per-token
        and its count over every dp replica, which ``settle`` scales the
        gradients by; dp replicas whose losses were of both kinds fail the
        step, naming them. So do a per-token loss's reports (engine.reports):
        each replica's sums in slots laid out as the ranks last agreed, or,
        laid out otherwise, a word that they are, then the layouts in the
        all-gather; replicas reporting other names fail the step. So does
        a loss scale (``step(scaler=)``, engine.scaled): each rank's, which
        must be alike, and whether its gradients were finite, which every
        rank learns. And each dp replica's share of the step's loss
        (``share``, known on its last stage's ranks; -inf elsewhere, the
        all-reduce's maximum takes it): every rank takes their mean
        (``loss``, the step's loss, which ``settle`` ends), so the step
        returns it on every rank at no message of its own."""
        pipe, whole = self.pipe, self.pipe.whole
        if whole.size == 1:
            self.counts.agreed(None)
            self.loss = self.share
            return
        at = _slots(pipe.dp.size if pipe.dp is not None else 1, width(pipe.report_layout))
        failed = self._word(error, at)
        heard = self._heard(error, failed, at)
        if heard is not None:
            self._verdict(error, heard, bool(failed[0]), at.replicas)

    def _word(self, error: BaseException | None, at: _Slots) -> np.ndarray:
        """This rank's word in the step's agreement, in the slots ``at``
        lays out (an all-reduce's maximum merges the ranks' words): whether
        its part failed, its rows of inputs and targets, its kind of loss
        and count, its reports, its loss scale, its replica's share of the
        loss, and whether it evaluates or trains."""
        pipe = self.pipe
        agreed, reports = pipe.report_layout, self.counts.reports
        failed = np.zeros(at.size, dtype=np.float64)
        failed[at.lo:at.amp - 1] = -np.inf
        failed[0] = 0 if error is None else 1
        failed[1 + 2 * pipe.dp_index:3 + 2 * pipe.dp_index] = (self.in_rows + 1,
                                                               self.target_rows + 1)
        loss_here = error is None and self.counts.kind() is not None
        if error is None:
            i = 1 + 2 * at.replicas + 2 * pipe.dp_index
            failed[i:i + 2] = self.counts.slots()
            i = at.said + 1 + at.span * pipe.dp_index
            failed[at.said], failed[i:i + at.span] = reports.said(agreed, loss_here)
            failed[at.amp:at.amp + 4] = self.scaled.slots(pipe)
            if self.share is not None:
                failed[at.lo + pipe.dp_index], failed[at.amp - 1] = self.share, 1
        failed[-2:] = (1, 0) if self.forward_only else (0, 1)
        return failed

    def _heard(self, error: BaseException | None, failed: np.ndarray, at: _Slots
               ) -> _Heard | None:
        """Every rank's word merged (``failed``, all-reduced in place) and read:
        the loss scale, the rows that do not pair, the kinds of loss, the
        reports and the step's loss taken; where some rank failed, evaluates
        beside training ranks or laid its reports out anew, every rank's
        reason too (an all-gather, which also realigns the tp groups'
        collectives). None where ``agree`` is done: the step went well
        everywhere, or the exchange itself failed with this rank's own
        error to raise (without one, it is rolled back and raised)."""
        pipe, whole = self.pipe, self.pipe.whole
        agreed, reports = pipe.report_layout, self.counts.reports
        replicas, said, span, lo, amp = at.replicas, at.said, at.span, at.lo, at.amp
        loss_here = error is None and self.counts.kind() is not None
        evals: list[int] = []
        unlike: str | None = None       # replicas reporting other names: why the step fails
        try:
            collectives.all_reduce(whole, failed, op="max", timeout=pipe.timeout)
            if not failed[0] and not (failed[-2] and failed[-1]):   # (a scale unlike
                # another rank's: raised, rolled back; eval_step beside step is told below)
                self.scaled.agreed(failed[amp:amp + 4], f"rank {whole.rank} of {whole.name}: "
                                   f"pipeline step {self.n} ({pipe.schedule.name})")
            rows = failed[1:1 + 2 * replicas].reshape(replicas, 2) - 1
            m = pipe.schedule.num_microbatches
            wrong = [(d, int(a), int(b)) for d, (a, b) in enumerate(rows)
                     if a >= 0 and b >= 0 and not _paired(int(a), int(b), m)]
            kinds = self.counts.agreed(failed[1 + 2 * replicas:said].reshape(replicas, 2))
            mixed = bool(failed[-2] and failed[-1])
            relaid = failed[said] == 2
            if failed[said] == 1:
                reports.from_slots(agreed, failed[said + 1:lo].reshape(replicas, span))
            if failed[amp - 1]:     # (the replicas' shares' mean: collectives' avg, alike)
                self.loss = float(failed[lo:amp - 1].sum() / replicas)
            if not failed[0] and not wrong and not mixed and not all(kinds) and not relaid:
                return None
            if not failed[0] and not mixed and not relaid:
                reasons: list[str | None] = []
            else:
                mine = None if error is None else f"{type(error).__name__}: {error}"
                tp_seq = pipe.tp.collective_channel().seq if pipe.tp is not None else 0
                told = collectives.all_gather_object(
                    whole, [mine, tp_seq, self.forward_only, pipe.dp_index,
                            reports.told(loss_here) if relaid else None], timeout=pipe.timeout)
                reasons = [t[0] for t in told]
                evals = [r for r, t in enumerate(told) if t[2]] if mixed else []
                self.realign_tp([t[1] for t in told])
                if relaid and not failed[0] and not mixed and not wrong and not all(kinds):
                    pipe.report_layout, unlike = reports.from_told(
                        {t[3]: t[4] for t in told if t[4] is not None})
        except Exception:
            if error is not None:
                return None                  # this rank's own error is raised
            self.roll_back()                 # a lost peer, a timeout: raised as it is
            raise
        return _Heard(wrong, evals, kinds, unlike, reasons, m)

    def _verdict(self, error: BaseException | None, heard: _Heard, failed: bool,
                 replicas: int) -> None:
        """What every rank raises once it has heard the others (``failed``:
        whether some rank's part failed), rolled back first where its own
        part finished: a ValueError for ranks evaluating beside training
        ones, replicas of both kinds of loss or of other reports, and rows
        that do not pair; else StepFailed naming the ranks that failed. A
        rank with its own ``error`` returns, for its caller raises it."""
        pipe, whole = self.pipe, self.pipe.whole
        wrong, evals, kinds, unlike, reasons, m = heard
        if evals:
            if error is None:
                self.roll_back()
            steps = [r for r in range(whole.size) if r not in evals]
            raise ValueError(
                f"rank {whole.rank} of {whole.name}: pipeline step {self.n} "
                f"({pipe.schedule.name}): ranks {evals} of {whole.name} called eval_step() "
                f"where ranks {steps} called step(): every rank calls the same, as often "
                "(an evaluation takes a step's tags); rolled back on every rank") from error
        if all(kinds) and not failed:
            self.roll_back()
            raise ValueError(
                f"rank {whole.rank} of {whole.name}: pipeline step {self.n} "
                f"({pipe.schedule.name}): loss_fn(output, target) returned a per-token (sum, "
                f"count) on dp replicas {kinds[0]} but a mean (a loss alone) on dp replicas "
                f"{kinds[1]}: every replica's micro-batches return one kind; rolled back on "
                "every rank")
        if unlike is not None:
            self.roll_back()
            raise ValueError(f"rank {whole.rank} of {whole.name}: pipeline step {self.n} "
                             f"({pipe.schedule.name}): {unlike}; rolled back on every rank")
        if not failed and not wrong:     # (the reports laid out anew: the step is done)
            return
        if wrong:
            if error is None:
                self.roll_back()
            sched = pipe.schedule
            raise ValueError(
                f"rank {whole.rank} of {whole.name}: pipeline step {self.n} ({sched.name}): "
                + "; ".join(f"{f'dp replica {d}: ' if replicas > 1 else ''}the inputs (pp rank "
                            f"{sched.rank_of(0)}) have {a} rows but the targets (pp rank "
                            f"{sched.rank_of(sched.num_stages - 1)}) {b}" for d, a, b in wrong)
                + f": {_PAIRED.format(m=m)}; rolled back on every rank") from error
        if error is not None:
            return
        self.roll_back()
        where = "; ".join(f"rank {r} of {whole.name}: {why}"[:_REASON_MAX]
                          for r, why in enumerate(reasons) if why is not None)
        raise StepFailed(f"pipeline step {self.n} failed elsewhere after rank {whole.rank} "
                         f"finished its part; rolled back on every rank ({where})")

    def realign_tp(self, seqs: list[int]) -> None:
        """After a failed step: every rank of this rank's tp group takes the
        highest collective number any of them reached (``seqs``, by rank of
        the pipeline's grid), so their next collectives number alike; the
        numbers skipped were aborted (late messages on them are dropped)."""
        tp, whole = self.pipe.tp, self.pipe.whole
        if tp is None:
            return
        ch = tp.collective_channel()
        ch.seq = max(seqs[whole.ranks.index(w)] for w in tp.ranks)

    def _abandon_tp(self, reason: str, kind: AbortKind, lost: int | None,
                    own: bool = True) -> None:
        """Fail the tp peers' next collective, which this rank will not make
        (they run the same stage and would wait in it until its timeout),
        unless this rank's last tp collective of the step was aborted by a
        peer (``own`` False: the group knows) that made the step's earlier
        ones with it, or that is lost. A peer that aborted the step's first
        one may have done so outside any step (a tp collective it called
        alone timed out): it is a collective ahead, waiting
        in the step's first one, for the timeout, step after step, unless
        that is failed too. tp peers make their
        collectives in lockstep, so a peer is at most one collective ahead,
        waiting in it; when this rank failed in a collective by its own
        error, a peer may have finished that one and wait in the next, so
        that one is failed too. The ranks may then end the step one
        collective apart: ``agree`` lines them up (``realign_tp``)."""
        tp = self.pipe.tp
        if tp is None:
            return
        ch = tp.collective_channel()
        if not own and (ch.seq > self.tp_seq + 1 or lost is not None) \
                and ch.aborted(-ch.seq, "tp collective") is not None:
            return
        collectives.abandon(tp, reason, kind, lost)
