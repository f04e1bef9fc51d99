"""Collectives between processes of one host without sockets: a board in each
rank's memory for synchronization (``board``), peers' memory read directly
(``cma``), and the collectives built on the two (``local``)."""
