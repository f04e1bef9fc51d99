"""A latency-bandwidth cost model of meshrun's collectives: unit costs per
path fitted on this machine (collectives.model.costs), predictions at 2 to
32 ranks checked against measurements, and an extrapolation to many hosts
(collectives.model.scale). ``python -m collectives.model --help``.
"""
from .costs import (OPS, PATHS, Params, Terms, algorithm, fit_params, predict, rel_errors,
                    share, terms)
from .scale import ALGORITHMS, Cluster, at_scale, best, parse_link
from .store import Fit, default_path, load, save

__all__ = ["OPS", "PATHS", "Params", "Terms", "algorithm", "fit_params", "predict",
           "rel_errors", "share", "terms", "ALGORITHMS", "Cluster", "at_scale", "best",
           "parse_link", "Fit", "default_path", "load", "save"]
