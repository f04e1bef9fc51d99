"""Collectives on host (numpy) arrays: ``paths`` checks a call and picks its
path; the rest are the algorithms over mesh point-to-point."""
