"""Every rank at once, for ``engine.distribute`` and its jobs: the failures
every rank raises together (``DistributeFailed``, ``GatherFailed``), the
ranks' word that their part of a dry run (or of distribute's work between
its exchanges) failed or not (``_told``, read by ``_verdict``), the
tp ranks' word that each one's part ran or failed (``_tp_agreed``) and the
handshake by which a lone ``job.state_dict()`` or ``optimizer_state_dict()``
caller is told, not waited on (``_all_called``: each word carries its
caller's call number; a timed-out word is withdrawn, and the caller of a
word taken says whether it still waits on it), the parts those calls send
group rank 0 (``_sent``) and its word that ends each sender's call once it
took them all, or failed (``_each_part``), with the tags of those calls'
point-to-point messages.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import collectives
from mesh import Comm, MeshError, waitany


_STATE_TAG = 1 << 60      # state_dict()'s point-to-point messages, far above the pipeline's
_OPTIM_TAG = _STATE_TAG + (1 << 40)     # optimizer_state_dict()'s, above those
_HERE_TAG = _STATE_TAG - 1      # each rank's word that it called them too (_all_called)
_DONE_TAG = _STATE_TAG - 2      # each tp rank's word that its part ran or failed (_tp_agreed)
_STILL_TAG = _STATE_TAG - 3     # each rank's reply that a word taken is its call's (_all_called)
_GONE_TAG = _STATE_TAG - 4      # each rank's word that its call ended there, raised (_Called)
_TAKEN_TAG = _STATE_TAG - 5     # group rank 0's word that it took every part, or failed (_sent)


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
                what: str = "", keep: bool = False) -> "_Called | None":
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
    GatherFailed naming that older error).
    A rank interrupted as it waits here (a KeyboardInterrupt: its own error,
    not a MeshError) raises it at once, having told group rank 0 first
    (``_Called.ended``): rank 0 takes its word as one that says that error
    (and ends any wait of its own on that rank), so every rank raises at
    once, GatherFailed naming it; rank 0 so interrupted answers every word
    it took, or finds waiting, with its own error, then raises it (alone,
    either left the others waiting here until their timeout). ``keep``:
    the call goes on (a pp gather's state, sent to rank 0): its ``_Called``
    is returned, whose ``recv`` and ``ended`` do the same for what follows,
    and which the caller closes (None where ``g`` has one rank)."""
    if g.size < 2:
        return None
    me = g.ranks[g.rank]
    said = None if failed is None else getattr(failed, "told", None) or (    # (a tp peer's)
        f"rank {me}: {type(failed).__name__}: {failed}"[:400])
    call = _Called(g, timeout)
    if g.rank:
        n = call.n = next(_CALLS)
        g.send([n, said, False], 0, tag=_HERE_TAG, timeout=timeout)
        try:
            told = _answer(g, n, timeout)
        except MeshError:
            try:    # (withdrawn: rank 0's next call takes this rank's next word, not this)
                g.send([n, None, True], 0, tag=_HERE_TAG, timeout=timeout)
            except MeshError:
                pass
            if failed is not None:
                return None     # (its own error is raised)
            raise
        except BaseException as e:
            call.ended(e)
            raise
        if failed is None and told is not None:
            raise _gather_failed(me, what, told)
        return call if keep else None
    try:
        for r in range(1, g.size):
            try:
                call.words[r] = _taken(call, r)
            except MeshError:
                if failed is None:
                    raise
                break            # (this rank's own error is raised)
        call.heard()
    except BaseException as e:
        if not isinstance(e, MeshError):
            call.interrupted(e)
        call.close()
        raise
    bad = [w for _, w in call.words.values() if w is not None]
    told = said if said is not None else "; ".join(bad) if bad else None
    try:
        for r, (n, _) in call.words.items():
            g.send([n, told, False], r, tag=_HERE_TAG, timeout=timeout)
    except BaseException as e:
        if not isinstance(e, MeshError):
            call.interrupted(e)
        call.close()
        raise
    if failed is None and bad:
        call.close()
        raise _gather_failed(me, what, "; ".join(bad))
    if keep and failed is None:
        return call
    call.close()
    return None


_CALLS = itertools.count()      # this rank's words' numbers (_all_called), each call its own


def _gather_failed(me: int, what: str, told: str) -> GatherFailed:
    """GatherFailed on world rank ``me``: ``what`` failed on the ranks
    ``told`` names, which it keeps (``told``: a tp rank 0's word to its pp
    group says them, not its own GatherFailed)."""
    e = GatherFailed(f"rank {me}: {what} failed on {told}; nothing was gathered")
    e.told = told       # type: ignore[attr-defined]
    return e


class _Called:
    """One ``_all_called`` call, on each rank. Group rank 0 keeps the words
    taken (``words``: each rank's number and what it said) and, for each of
    those ranks, a receive posted on its notices (``_GONE_TAG``): a rank
    whose call ended after its word (a KeyboardInterrupt as it waited, or as
    it sent its state) says so there (``ended``), with its word's number and
    its error, and raises it at once; rank 0 then takes its word as one that
    says that error (``gone``), and ends its own wait on that rank
    (``recv``). A notice of another word (an older one: that rank's lone
    call, interrupted) is passed over. On the other ranks, ``n``: this
    call's word."""

    def __init__(self, g: Comm, timeout: float | None) -> None:
        self.g, self.timeout = g, timeout
        self.n = -1
        self.words: dict[int, tuple[int, str | None]] = {}
        self.nums: dict[int, int] = {}          # rank -> its word taken's number
        self.notes: dict[int, Any] = {}         # rank -> the receive posted on its notices
        self.gone: dict[int, str] = {}          # rank -> its notice for its word taken
        # the message a ``recv`` that raised (a KeyboardInterrupt) had taken: (rank, tag,
        # its receive, still landing; None: its value lost), for ``_each_part``'s drain
        self.landing: tuple[int, int, Any] | None = None

    def ended(self, e: BaseException) -> None:
        """Tell group rank 0 that this rank's call ended here with ``e``."""
        me = self.g.ranks[self.g.rank]
        try:
            self.g.send([self.n, f"rank {me}: {type(e).__name__}: {e}"[:400]], 0,
                        tag=_GONE_TAG, timeout=self.timeout)
        except MeshError:
            pass

    def interrupted(self, e: BaseException) -> None:
        """Group rank 0's own error ``e`` as it took the words: every word
        taken, and every word waiting unread, answered with it (each of
        those ranks raises GatherFailed naming rank 0)."""
        g = self.g
        said = f"rank {g.ranks[0]}: {type(e).__name__}: {e}"[:400]
        try:
            for r in range(1, g.size):
                word = (self.nums[r], None) if r in self.nums else _word(g, r, self.timeout,
                                                                          wait=False)
                if word is not None:
                    g.send([word[0], said, False], r, tag=_HERE_TAG, timeout=self.timeout)
        except MeshError:
            pass

    def told(self, r: int, said: str | None) -> None:
        """Group rank 0's word that ends rank ``r``'s call (``_sent``):
        every part taken (``said`` None), or what failed the gather."""
        try:
            self.g.send([self.words[r][0], said], r, tag=_TAKEN_TAG, timeout=self.timeout)
        except MeshError:
            pass

    def took(self, r: int, n: int) -> str | None:
        """Rank ``r``'s word ``n`` taken (on group rank 0): its notices
        watched from now on; what its notice for ``n`` says, if one came."""
        self.nums[r] = n
        if r not in self.notes and r not in self.gone:
            self.notes[r] = self.g.irecv(r, tag=_GONE_TAG)
        return self._noticed(r)

    def _noticed(self, r: int, got: Any = None) -> str | None:
        """What rank ``r``'s notice for its word taken says, once one came
        (``got``: one taken already); notices of its other words passed over."""
        note = self.notes.get(r)
        while note is not None and (got is not None or note.get_status()):
            if got is None:
                try:
                    got = note.wait()
                except MeshError:       # (rank r gone: what it sent is read as a recv reads it)
                    del self.notes[r]
                    break
            m, said = got
            got = None
            if int(m) == self.nums[r]:
                del self.notes[r]
                self.gone[r] = str(said)
                break
            self.notes[r] = note = self.g.irecv(r, tag=_GONE_TAG)
        return self.gone.get(r)

    def recv(self, r: int, tag: int) -> Any:
        """``g.recv(r, tag)`` on group rank 0, ending where rank ``r``'s
        notice for its word taken comes first (``_Ended``, its text). A
        message come already is received as ``recv`` does (a same-host
        ring's short way: through ``waitany`` a state of 400 small arrays
        took up to 3.7x as long, BENCHMARKS.md); only one still to come is
        waited for beside the notice."""
        if r in self.gone:
            raise _Ended(self.gone[r])
        if r not in self.notes or _come(self.g, r, tag):
            try:
                return self.g.recv(r, tag=tag, timeout=self.timeout)
            except BaseException as e:
                if not isinstance(e, MeshError) and not _come(self.g, r, tag):
                    self.landing = (r, tag, None)   # (come before, taken as it raised)
                raise
        req = self.g.irecv(r, tag=tag)
        end = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while r in self.notes:
                left = None if end is None else max(end - time.monotonic(), 0.0)
                try:
                    i, got = waitany([req, self.notes[r]], left)
                except MeshError:
                    if req.done() or not self.notes[r].done():
                        raise
                    del self.notes[r]   # (rank r gone: what it sent is read as a recv reads it)
                    break
                if i == 0:
                    return got
                if self._noticed(r, got) is not None:
                    raise _Ended(self.gone[r])
            return req.wait(None if end is None else max(end - time.monotonic(), 0.0))
        except BaseException as e:
            if not req.cancel() and not isinstance(e, (MeshError, _Ended)):
                self.landing = (r, tag, req)    # (a message had matched it: it lands)
            raise

    def heard(self) -> None:
        """Every notice come by now read: each word taken whose rank's call
        ended says that rank's error."""
        for r in list(self.notes):
            self._noticed(r)
        for r, said in self.gone.items():
            if r in self.words:
                self.words[r] = (self.words[r][0], said)

    def close(self) -> None:
        """The notices' receives withdrawn (one taken meanwhile: read)."""
        for r in list(self.notes):
            if not self.notes[r].cancel():
                self._noticed(r)
                if r in self.notes:
                    self.notes.pop(r).cancel()
        self.notes.clear()


class _Ended(Exception):
    """A rank's call ended after its word (``_Called.recv``): its text."""


def _sent(call: _Called, first: Any, parts: list[Any], tag: int, what: str) -> None:
    """A pp rank's part of a gather (``first``, then each of ``parts``) sent
    to group rank 0 on ``tag`` and the tags after it; then rank 0's word that
    it took every rank's part (``_each_part``): where the gather failed
    there (another rank's error, or rank 0's own: a KeyboardInterrupt as it
    took the parts), GatherFailed naming it (alone, rank 0 interrupted so
    left this rank's part unread, which its next call took for its own, and
    this rank returned None, or waited in a send that rank 0 did not read
    until its timeout). Where this rank's own error stops it (a
    KeyboardInterrupt), rank 0 is told (``_Called.ended``), which then takes
    the others' parts and raises GatherFailed naming it (alone, it waited
    for the rest until its timeout)."""
    g, timeout = call.g, call.timeout
    try:
        g.send(first, 0, tag=tag, timeout=timeout)
        for i, v in enumerate(parts):
            g.send(v, 0, tag=tag + 1 + i, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        m = None
        while m != call.n:      # (an earlier call's word, whose wait ended: skipped)
            left = None if end is None else max(end - time.monotonic(), 0.0)
            m, told = g.recv(0, tag=_TAKEN_TAG, timeout=left)
    except BaseException as e:
        if not isinstance(e, MeshError):
            call.ended(e)
        raise
    if told is not None:
        raise _gather_failed(g.ranks[g.rank], what, told)


def _each_part(call: _Called, tag: int, count: Callable[[Any], int], what: str,
               take: Callable[[int, Any, list[Any]], None]) -> None:
    """On group rank 0: each other rank's part of a gather (``_sent``),
    given to ``take(its rank, its first message, its parts: count(first)
    of them)``; a rank whose call ended meanwhile (its notice) is passed
    over, and once the others' parts are taken (none left unread)
    GatherFailed names it, here and, in rank 0's word that ends each
    other rank's call, there. This rank's own error meanwhile (a
    KeyboardInterrupt, or ``take``'s) is raised once every part still on
    its way is taken and dropped (``_drained``: left unread, the next call
    took them for its own) and the others are told it in that word, so
    they raise GatherFailed naming it. The notices' receives are withdrawn
    at the end."""
    g = call.g
    ended: dict[int, str] = {}
    at: dict[int, int] = {}         # rank -> how many of its messages were taken
    firsts: dict[int, Any] = {}
    try:
        for r in range(1, g.size):
            try:
                at[r] = 0
                first = firsts[r] = call.recv(r, tag)
                at[r] = 1
                parts = []
                for i in range(count(first)):
                    parts.append(call.recv(r, tag + 1 + i))
                    at[r] += 1
            except _Ended as e:
                ended[r] = str(e)
                continue
            take(r, first, parts)
    except BaseException as e:
        said = f"rank {g.ranks[0]}: {type(e).__name__}: {e}"[:400]
        for r in range(1, g.size):
            if r not in ended and _drained(call, r, tag, count, at.get(r, 0), firsts):
                call.told(r, said)
        raise
    finally:
        call.close()
    told = "; ".join(ended.values()) or None
    for r in range(1, g.size):
        if r not in ended:
            call.told(r, told)
    if told is not None:
        raise _gather_failed(g.ranks[0], what, told)


def _drained(call: _Called, r: int, tag: int, count: Callable[[Any], int], at: int,
             firsts: dict[int, Any]) -> bool:
    """On group rank 0, its own error raised as it took the parts: rank
    ``r``'s part taken on from its message ``at`` (the one a ``recv`` that
    raised had taken first: ``_Called.landing``) and dropped; False where
    that rank's call ended meanwhile (it waits for no word). A rank whose
    part cannot be taken (lost, its first message's value lost as the
    interrupt came) is left (its messages unread)."""
    try:
        landing = call.landing
        if landing is not None and landing[:2] == (r, tag + at):
            call.landing = None
            if landing[2] is None and at == 0:
                return True         # (how many follow is lost with it)
            got = None if landing[2] is None else landing[2].wait(call.timeout)
            if at == 0:
                firsts[r] = got
            at += 1
        if at == 0:
            firsts[r] = call.recv(r, tag)
            at = 1
        for i in range(at - 1, count(firsts[r])):
            call.recv(r, tag + 1 + i)
    except _Ended:
        return False
    except Exception:       # (a MeshError: that rank lost; its part's own)
        pass
    return True


def _come(g: Comm, r: int, tag: int) -> bool:
    """Whether a message of rank ``r`` with ``tag`` waits here (``iprobe``,
    whose LostPeerError for a lost ``r`` reads as none: the receive after
    raises it, where one is made)."""
    try:
        return g.iprobe(r, tag) is not None
    except MeshError:
        return False


def _word(g: Comm, r: int, timeout: float | None, wait: bool = True
          ) -> tuple[int, str | None] | None:
    """Rank ``r``'s word for this call (``_all_called``, on group rank 0):
    its number and what it said. A word that rank withdrew (its lone call
    timed out) does not count: each is followed by its withdrawal, so the
    last word there, not withdrawn, is this call's (a lone call's word,
    taken for the next call's, made rank 0 answer it: that rank's next lone
    call took the answer for its own and sent its stage's state unasked,
    returning None, and the checkpoint after held that stage as it was).
    Only a word whose call ended there unanswered (a KeyboardInterrupt, told
    in its notice: ``_Called``) stays, not withdrawn: the first such is this
    call's, and the words after it are kept for the next calls (taken for
    this one, the interrupted rank's next call, the call its peers were
    making with it, took the answer the interrupted one was owed, and its
    peers' next call waited for it). ``wait``: False, None where no word
    has come."""
    kept = _KEPT.setdefault((g.gid, r), [])
    while True:
        while _come(g, r, _HERE_TAG):
            n, said, gone = g.recv(r, tag=_HERE_TAG, timeout=timeout)
            kept[:] = [w for w in kept if w[0] != int(n)] if gone else kept + [(int(n), said)]
        if kept or not wait:
            return kept.pop(0) if kept else None
        n, said, gone = g.recv(r, tag=_HERE_TAG, timeout=timeout)
        if not gone:
            kept.append((int(n), said))


_KEPT: dict[tuple[int, int], list[tuple[int, str | None]]] = {}   # (group, rank): words come


def _taken(call: _Called, r: int) -> tuple[int, str | None]:
    """Rank ``r``'s word for this call (``_word``), once that rank says it
    still waits on it (a failed rank's too: it waits for its answer as
    well): where it withdrew it, the withdrawal still on its way (iprobe saw
    none), its next word. Rank 0 took the withdrawn word for the call's and
    answered it: that rank, waiting for the answer to its new word, timed out
    (a checkpoint after a lone call), and rank 0 waited for its state.
    A word whose call ended there (its notice: ``_Called``) is taken at
    once, saying that rank's error."""
    g, timeout = call.g, call.timeout
    while True:
        word = _word(g, r, timeout)
        assert word is not None
        n, said = word
        ended = call.took(r, n)
        if ended is not None:
            return n, ended
        g.send([n, None, True], r, tag=_HERE_TAG, timeout=timeout)
        m = None
        try:
            while m != n:   # (a reply to an earlier call's question, which timed out: skipped)
                m, still = call.recv(r, _STILL_TAG)
        except _Ended as e:
            return n, str(e)
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
