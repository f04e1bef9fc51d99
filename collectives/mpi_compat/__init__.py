"""collectives.MPI's parts (mpi4py's MPI over meshrun): types.py the
constants, datatypes and ops; buffers.py the buffer specs; requests.py
Status and Request; message.py Message; p2p.py point-to-point; coll.py the
buffer collectives; objects.py the lowercase ones; comm.py the
communicators, group.py their groups; win.py the one-sided windows. Import collectives.MPI, not
these."""
