"""Collectives between processes of one host without sockets: a board in each
rank's memory for synchronization (``board``; a collective on it: ``round``,
its waits: ``waiting``, a repeated tiny call's: ``quick``), peers' memory read
directly (``cma``), and the collectives built on the two (``local``: those that
reduce in ``local_reduce``, those that move data in ``local_move``; a user-defined
op's, whole operands combined in Python, in ``local_fold``)."""
