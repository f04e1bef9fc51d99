"""Programs, not library: ``python -m collectives.tools.bench`` (nccl-tests style
table, ``bench_gloo`` runs torch's side) and ``python -m collectives.tools.soak``."""
