"""Every rank at once, for ``engine.distribute`` and its jobs: the failures
every rank raises together (``DistributeFailed``, ``GatherFailed``), the
ranks' word that their part of a dry run (or of distribute's work between
its exchanges) failed or not (``_told``, read by ``_verdict``), the
tp ranks' word that each one's part ran or failed (``_tp_agreed``) and the
handshake by which a lone ``job.state_dict()`` or ``optimizer_state_dict()``
caller is told, not waited on (``_all_called``: each word carries its
caller's call number; a timed-out word is withdrawn, and the caller of a
word taken says whether it still waits on it), with the tags of those
calls' point-to-point messages.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

import collectives
from mesh import Comm, MeshError


_STATE_TAG = 1 << 60      # state_dict()'s point-to-point messages, far above the pipeline's
_OPTIM_TAG = _STATE_TAG + (1 << 40)     # optimizer_state_dict()'s, above those
_HERE_TAG = _STATE_TAG - 1      # each rank's word that it called them too (_all_called)
_DONE_TAG = _STATE_TAG - 2      # each tp rank's word that its part ran or failed (_tp_agreed)
_STILL_TAG = _STATE_TAG - 3     # each rank's reply that a word taken is its call's (_all_called)


class DistributeFailed(MeshError):
    """engine.distribute's own timing of the model (its profile, a job's
    ``retime()``, which call ``loss_fn``), its checks of what every rank
    was given (the models compared, the sample's rows), its dry runs (a
    dry step's failure too) or its own work between its exchanges (the
    plan applied, the dry runs' figures, the candidates' simulation and
    ranking, the cut, the Pipeline made, the table simulated again) failed
    on another rank, whose own error (a KeyboardInterrupt there) is the
    root cause: every other rank raises this, whatever that error was (a
    rank's wrong arguments aside: every rank raises their ValueError)."""

    from_abort = True
    __module__ = "engine"     # its public home: reports and pickles name it there


class GatherFailed(MeshError):
    """A job's state gather (``state_dict()``, ``optimizer_state_dict()``)
    failed on another rank, whose own error is the root cause."""

    from_abort = True
    __module__ = "engine"     # its public home: reports and pickles name it there


def _told(world: Comm, failed: BaseException | None, timeout: float | None = None) -> None:
    """Every rank's word whether its part failed (``failed``: its error,
    None: none), an all-gather over ``world`` where the ranks would meet
    anyway (engine.calibrate's dry runs, in place of a barrier; after a
    step of distribute's own work that no exchange follows): every rank
    then raises at once (``_verdict``; a rank that raised alone left the
    others waiting for it in their next collective until their timeout)."""
    said = None if failed is None else [f"{type(failed).__name__}: {failed}"[:400],
                                        bool(getattr(failed, "from_abort", False))]
    told = collectives.all_gather_object(world, said, timeout=timeout)
    _verdict(world, failed, [(r, t) for r, t in enumerate(told) if t is not None])


def _verdict(world: Comm, failed: BaseException | None, told: list[tuple[int, Any]]) -> None:
    """After a word (``_told``, engine.layer_timing's ``_exchange``): the
    ranks whose part failed (``told``: each one's ``[text, whether a peer's
    abort]``) make every rank raise, this one its own error (``failed``),
    the others DistributeFailed naming the first rank whose error was its
    own and carrying its text; so does a rank whose ``failed`` is only a
    peer's abort (a dry step that failed on another rank: the step's
    MeshError, which a caller of distribute could not tell from any other)."""
    root = next(((r, t) for r, t in told if not t[1]), None)
    if failed is not None and (root is None or not getattr(failed, "from_abort", False)):
        raise failed
    if told:
        r, (text, _) = root or told[0]
        raise DistributeFailed(f"rank {world.rank}: engine.distribute failed on rank {r}: "
                               f"{text}") from failed


def _tp_agreed(tp: Comm, timeout: float | None, failed: BaseException | None,
               what: str) -> MeshError | None:
    """After a state gather's tp part (``what``: the call), each tp rank's
    word to tp rank 0 (its part's error, ``failed``, and its collective
    number), and rank 0's answer, point to point: GatherFailed naming the
    ranks that failed, for a rank whose own part ran, where any failed (None
    elsewhere); and every rank takes the highest number, as a failed
    step's (a peer whose part had made no more gathers skips the one its
    failed peer abandoned, which failed its next step)."""
    ch = tp.collective_channel()
    me = tp.ranks[tp.rank]
    said = None if failed is None else f"rank {me}: {type(failed).__name__}: {failed}"[:400]
    if tp.rank:
        tp.send([said, ch.seq], 0, tag=_DONE_TAG, timeout=timeout)
        told, top = tp.recv(0, tag=_DONE_TAG, timeout=timeout)
    else:
        words = [tp.recv(r, tag=_DONE_TAG, timeout=timeout) for r in range(1, tp.size)]
        bad = [w for w in [said] + [w for w, _ in words] if w is not None]
        told, top = ("; ".join(bad) if bad else None), max([ch.seq] + [q for _, q in words])
        for r in range(1, tp.size):
            tp.send([told, top], r, tag=_DONE_TAG, timeout=timeout)
    if told is None:
        return None
    ch.seq = max(ch.seq, int(top))
    return None if failed is not None else GatherFailed(
        f"rank {me}: {what} failed on {told}; nothing was gathered")


def _raised(failed: BaseException | None) -> None:
    """Raise ``failed`` (this rank's own error, once the others are told)."""
    if failed is not None:
        raise failed


def _all_called(g: Comm, timeout: float | None, failed: BaseException | None = None,
                what: str = "") -> None:
    """Wait until every rank of ``g`` called this too (a job's gather of its
    state or its optimizer's, over tp or pp): each tells group rank 0, which
    answers them all once it has every word, point to point. A rank that
    calls it alone times out here having sent nothing else: no tp collective
    taken (its peers' next ones, a step's, numbered as its own: a timed-out
    gather took a number they had not, and their next step failed), and no
    stage's state left for rank 0's next call to take as its own (a pp rank
    alone sent its state unasked, and returned None: the next checkpoint
    held that stage as it was then). It withdraws its word (``_word``), so
    rank 0's next call waits for its next one; and since the withdrawal may
    be on its way still when rank 0 takes the word, rank 0 asks the rank
    whether it still waits on it (``_taken``), and takes its next word where
    it does not.
    A rank whose own part ``failed`` (``what``: the call) says so in its
    word, and group rank 0 in its answers: every rank of the group then
    raises at once (GatherFailed naming it; the failed rank its own error,
    which the caller raises), having sent no state, so no answer or state
    is left unread for the next call. The failed rank too waits for its
    answer, and withdraws its word where none comes (it raised at once:
    alone, its word was left for rank 0's next call, which raised
    GatherFailed naming that older error)."""
    if g.size < 2:
        return
    me = g.ranks[g.rank]
    said = None if failed is None else f"rank {me}: {type(failed).__name__}: {failed}"[:400]
    if g.rank:
        n = next(_CALLS)
        g.send([n, said, False], 0, tag=_HERE_TAG, timeout=timeout)
        try:
            told = _answer(g, n, timeout)
        except MeshError:
            try:    # (withdrawn: rank 0's next call takes this rank's next word, not this)
                g.send([n, None, True], 0, tag=_HERE_TAG, timeout=timeout)
            except MeshError:
                pass
            if failed is not None:
                return      # (its own error is raised)
            raise
        if failed is None and told is not None:
            raise GatherFailed(f"rank {me}: {what} failed on {told}; nothing was gathered")
        return
    words: dict[int, Any] = {}
    for r in range(1, g.size):
        try:
            words[r] = _taken(g, r, timeout)
        except MeshError:
            if failed is None:
                raise
            break            # (this rank's own error is raised)
    bad = [w for _, w in words.values() if w is not None]
    told = said if said is not None else "; ".join(bad) if bad else None
    for r, (n, _) in words.items():
        g.send([n, told, False], r, tag=_HERE_TAG, timeout=timeout)
    if failed is None and bad:
        raise GatherFailed(f"rank {me}: {what} failed on {told}; nothing was gathered")


_CALLS = itertools.count()      # this rank's words' numbers (_all_called), each call its own


def _word(g: Comm, r: int, timeout: float | None) -> tuple[int, str | None]:
    """Rank ``r``'s word for this call (``_all_called``, on group rank 0):
    its number and what it said. A word that rank withdrew (its lone call
    timed out) does not count: each is followed by its withdrawal, so the
    last word there, not withdrawn, is this call's (a lone call's word,
    taken for the next call's, made rank 0 answer it: that rank's next lone
    call took the answer for its own and sent its stage's state unasked,
    returning None, and the checkpoint after held that stage as it was)."""
    word = None
    while word is None or g.iprobe(r, _HERE_TAG) is not None:
        n, said, gone = g.recv(r, tag=_HERE_TAG, timeout=timeout)
        word = None if gone else (int(n), said)
    return word


def _taken(g: Comm, r: int, timeout: float | None) -> tuple[int, str | None]:
    """Rank ``r``'s word for this call (``_word``), once that rank says it
    still waits on it (a failed rank's too: it waits for its answer as
    well): where it withdrew it, the withdrawal still on its way (iprobe saw
    none), its next word. Rank 0 took the withdrawn word for the call's and
    answered it: that rank, waiting for the answer to its new word, timed out
    (a checkpoint after a lone call), and rank 0 waited for its state."""
    while True:
        n, said = _word(g, r, timeout)
        g.send([n, None, True], r, tag=_HERE_TAG, timeout=timeout)
        m = None
        while m != n:       # (a reply to an earlier call's question, which timed out: skipped)
            m, still = g.recv(r, tag=_STILL_TAG, timeout=timeout)
        if still:
            return n, said


def _answer(g: Comm, n: int, timeout: float | None) -> str | None:
    """Group rank 0's answer to this rank's word ``n`` (``_all_called``): an
    answer to an earlier word (rank 0 took it as this rank withdrew it) is
    skipped; rank 0's question whether this rank still waits on a word
    (``_taken``) is answered, yes for ``n`` alone."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if end is None else max(end - time.monotonic(), 0.0)
        m, told, asked = g.recv(0, tag=_HERE_TAG, timeout=left)
        if asked:
            g.send([m, m == n], 0, tag=_STILL_TAG, timeout=timeout)
        elif m == n:
            return told
