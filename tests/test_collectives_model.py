"""The cost model's arithmetic (collectives.model): which algorithm it
charges, the unit-cost counts, the fit, the extrapolation. No process, no
timing."""
import json
import math
import re

import numpy as np
import pytest

from collectives.model import (Cluster, Params, Terms, algorithm, at_scale, best, fit_params,
                               load, parse_link, predict, rel_errors, save, share, terms)
from collectives.model.__main__ import (CHECK_SIZES, FIT_SIZES, TABLES_BEGIN, TABLES_END, main,
                                        merge, split)
from collectives.model.costs import BOARD_CAPACITY, crowding, nnls, row_share
from collectives.model.store import Fit
from collectives.plan import Tuning

MIB = 1 << 20
BOARD = Params(a0=50e-6, alpha=3e-6, beta=0.2e-9, gamma=0.1e-9, delta=2e-6)
SOCK = Params(a0=100e-6, alpha=40e-6, beta=0.5e-9, gamma=0.3e-9, kappa=20e-6)


def test_board_capacity_is_the_boards():
    from collectives.shm.board import CAPACITY
    assert BOARD_CAPACITY == CAPACITY


def test_algorithm_follows_meshruns_size_switches():
    small = Tuning().small
    assert algorithm("board", "all_reduce", 8) == "board_small"
    assert algorithm("board", "all_reduce", small - 4) == "board_small"
    assert algorithm("board", "all_reduce", small) == "board_large"
    assert algorithm("board", "broadcast", small) == "board_small"     # <= on the board
    assert algorithm("board", "broadcast", small + 4) == "board_large"
    assert algorithm("socket", "all_reduce", small - 4) == "rd"
    assert algorithm("socket", "all_reduce", small) == "ring"
    assert algorithm("socket", "broadcast", 8) == "tree"
    assert algorithm("socket", "broadcast", small) == "chain"
    assert algorithm("socket", "all_gather", 8) == "ring"
    assert algorithm("board", "all_reduce", 8, Tuning(small=1 << 20)) == "board_small"
    assert algorithm("board", "all_reduce", 128 << 10, Tuning(small=1 << 20)) == "rd"
    with pytest.raises(ValueError):
        algorithm("pigeon", "all_reduce", 8)


def test_socket_counts():
    m = 4 * MIB
    # ring: 2(n-1) steps of one 1 MiB segment each; (n-1)/n of the buffer reduced
    assert terms("socket", "all_reduce", 4, m) == Terms(1, 6, 1.5 * m, 0.75 * m)
    # 16 MiB on 4 ranks: 4 MiB chunks, 4 segments a step
    assert terms("socket", "all_reduce", 4, 16 * MIB).msgs == 24
    # recursive doubling: log2 n rounds; n = 3 folds one rank in and back out
    assert terms("socket", "all_reduce", 4, 8) == Terms(1, 2, 16, 16)
    assert terms("socket", "all_reduce", 3, 8) == Terms(1, 3, 24, 16)
    # binomial tree: ceil(log2 n) hops; chain: n-2 hops to fill, then one per segment
    assert terms("socket", "broadcast", 5, 8) == Terms(1, 3, 24, 0)
    assert terms("socket", "broadcast", 4, 8 * MIB) == Terms(1, 10, 10 * MIB, 0)
    # all_gather: 3 ring steps, and its new m-byte output written
    assert terms("socket", "all_gather", 4, m) == Terms(1, 3, 1.75 * m, 0)
    assert terms("socket", "all_reduce", 1, m) == Terms(1, 0, 0, 0)


def test_board_counts():
    m = 2 * MIB
    assert terms("board", "all_reduce", 4, 8) == Terms(1, 3, 32, 24, 6)   # copy, combine x 3
    big = terms("board", "all_reduce", 4, m)
    assert (big.moved, big.reduced) == (1.5 * m, 0.75 * m)
    assert terms("board", "broadcast", 4, m).moved == m
    assert terms("board", "all_gather", 4, m).moved == m


def test_board_counts_one_alpha_per_peer_waited_for():
    # alpha on the board is a peer waited for: n - 1 each time a rank waits
    # for all its peers (collectives.shm.local), whatever the reads or segments
    n, p = 4, 3
    assert terms("board", "all_reduce", n, 8).msgs == p                 # gather
    assert terms("board", "all_reduce", n, 2 * MIB).msgs == 3 * p       # gather, stage 1, 2
    assert terms("board", "all_reduce", n, 16 * MIB).msgs == 3 * p      # 4 segments a chunk
    assert terms("board", "broadcast", n, 8).msgs == p
    assert terms("board", "broadcast", n, 2 * MIB).msgs == 2 * p        # the root: gather, stage 2
    assert terms("board", "all_gather", n, n * BOARD_CAPACITY).msgs == p          # payloads
    assert terms("board", "all_gather", n, n * BOARD_CAPACITY + 4 * n).msgs == 2 * p
    assert terms("board", "reduce", n, 2 * MIB).msgs == 2 * p + 1        # and the root's stage 2
    assert terms("board", "reduce_scatter", n, 2 * MIB).msgs == 2 * p
    # delta counts the operations on peers' data: reads, payload copies, combines
    assert terms("board", "all_reduce", n, 8).ops == 2 * p                # copy, combine
    assert terms("board", "all_reduce", n, 2 * MIB).ops == 3 * p          # read, combine, read
    assert terms("board", "all_reduce", n, 16 * MIB).ops == 9 * p         # 4 segments a chunk
    assert terms("board", "broadcast", n, 2 * MIB).ops == 1
    assert terms("board", "all_gather", n, 2 * MIB).ops == p
    assert terms("socket", "all_reduce", n, 2 * MIB).ops == 0
    # a 2-rank call waits for one peer, an 8-rank call for seven
    assert terms("board", "all_reduce", 8, 2 * MIB).msgs == 7 * terms(
        "board", "all_reduce", 2, 2 * MIB).msgs


def test_crowd_counts_exchange_messages_times_the_chance_the_core_is_elsewhere():
    # kappa: a message of an exchange whose receiver was off its core, chance 1 - cores/n
    assert crowding(2, 2) == crowding(1, 2) == crowding(8, None) == 0.0
    assert crowding(8, 2) == crowding(8, 2, "rd") == 0.75
    t = terms("socket", "all_reduce", 8, 8, cores=2)
    assert t.msgs == 3 and t.crowd == 2.25
    assert terms("socket", "all_gather", 8, 8, cores=2).crowd == 7 * 0.75       # ring
    assert terms("socket", "all_reduce", 8, 8).crowd == 0            # a core per rank
    assert terms("socket", "all_reduce", 2, 8, cores=2).crowd == 0
    assert terms("board", "all_reduce", 8, 8, cores=2).crowd == 0    # its waits count peers
    assert predict(SOCK, 2, "socket", "all_reduce", 8, 8) == pytest.approx(
        (SOCK.a0 + 3 * SOCK.alpha + 24 * SOCK.beta + 24 * SOCK.gamma + 2.25 * SOCK.kappa) / 0.25)


def test_crowd_saturates_and_spares_the_tree_and_chain():
    # at most one switch per message, however many ranks share a core
    counts = [crowding(n, 2) for n in (4, 8, 16, 32, 64, 1024)]
    assert counts == sorted(counts) and counts[-1] < 1.0
    assert crowding(32, 2) - crowding(16, 2) < crowding(8, 2) - crowding(4, 2)
    # tree and chain steps run one hop's two ranks, the others asleep: no crowd
    assert crowding(16, 2, "tree") == crowding(16, 2, "chain") == 0.0
    for size in (8, 4 * MIB):
        assert terms("socket", "broadcast", 16, size, cores=2).crowd == 0
        assert terms("socket", "reduce", 16, size, cores=2).crowd == 0
    assert terms("socket", "reduce_scatter", 16, 4 * MIB, cores=2).crowd == 15 * (1 - 2 / 16)
    # per call, 32 ranks on 2 cores: 2.2x the crowd of 16 (n / cores - 1 gave 4.4x)
    t16, t32 = (terms("socket", "all_gather", n, 1024, cores=2) for n in (16, 32))
    assert t32.crowd / t16.crowd == pytest.approx(31 * (1 - 2 / 32) / (15 * (1 - 2 / 16)))


def test_row_share_is_the_schedulers_then_the_probes_then_nominal():
    row = {"path": "board", "op": "all_reduce", "n": 8, "bytes": 8, "t": 1e-3}
    assert row_share(dict(row, share=0.1, ran=0.2), 2) == 0.2
    assert row_share(dict(row, share=0.1), 2) == 0.1
    assert row_share(row, 2) == 0.25
    # rel_errors divides by that share
    got = rel_errors(BOARD, 2, [dict(row, share=0.1, ran=0.2)])[0]
    assert got == pytest.approx(BOARD.time(terms("board", "all_reduce", 8, 8), 0.2) / 1e-3 - 1)


def test_merge_takes_each_rows_median_over_trials():
    base = {"path": "socket", "op": "broadcast", "n": 4, "size": 64, "bytes": 64}
    rows = [dict(base, t=t, share=0.5, ran=r, trial=i)
            for i, (t, r) in enumerate([(1.0, 0.5), (3.0, 0.1), (2.0, 0.4)])]
    other = dict(base, op="all_gather", t=5.0, share=0.5, ran=0.5)
    got = merge(rows + [other])
    assert len(got) == 2 and got[1] == other
    m = got[0]
    assert m["t"] == 2.0 and m["trials"] == 3 and "trial" not in m
    assert m["ran"] == pytest.approx(0.25)       # median of t x ran (0.5, 0.3, 0.8) / t
    assert m["share"] == pytest.approx(0.5)
    # two sizes asked for that move the same bytes (the sweep's smallest
    # all_gathers at 32 ranks) stay two rows
    a, b = (dict(base, op="all_gather", n=32, size=s, bytes=128, t=t) for s, t in ((8, 1.0),
                                                                                (64, 2.0)))
    assert [r["t"] for r in merge([a, b])] == [1.0, 2.0]


def test_delta_prices_the_ops_and_old_fits_load_without_it():
    t = terms("board", "all_reduce", 4, 16 * MIB)
    with_ops = Params(0, 0, 0, 0, delta=1e-6)
    assert with_ops.time(t) == pytest.approx(27e-6)
    assert with_ops.time(t, 0.5) == pytest.approx(54e-6)
    old = Fit.from_json({"cores": 2, "params": {
        p: {"a0": 1e-4, "alpha": 1e-5, "beta": 1e-10, "gamma": 1e-10} for p in ("board", "socket")}})
    assert old.params["board"].delta == old.params["socket"].kappa == 0.0


def test_share_and_prediction_scale_with_oversubscription():
    assert share(1, 2) == share(2, 2) == 1.0
    assert share(8, 2) == 0.25
    t2 = predict(BOARD, 2, "board", "all_gather", 2, MIB)
    assert predict(BOARD, 2, "board", "all_gather", 2, MIB) == pytest.approx(
        BOARD.time(terms("board", "all_gather", 2, MIB)))
    t8 = predict(BOARD, 2, "board", "all_gather", 8, MIB)
    assert t8 == pytest.approx(4 * BOARD.time(terms("board", "all_gather", 8, MIB)))
    assert t8 > t2


def _rows(params: Params, path: str, cores: int, shared: bool,
          sizes: tuple = FIT_SIZES) -> list[dict]:
    rows = []
    for op in ("all_reduce", "broadcast", "all_gather"):
        for n in (2, 3, 4, 8, 16):
            for size in sizes:
                sh = 0.8 * share(n, cores) if shared else share(n, cores)
                t = params.time(terms(path, op, n, size, cores=cores), sh)
                row = {"path": path, "op": op, "n": n, "size": size, "bytes": size, "t": t}
                if shared:
                    row["share"] = sh
                rows.append(row)
    return rows


@pytest.mark.parametrize("path,params", [("board", BOARD), ("socket", SOCK)])
@pytest.mark.parametrize("shared", [False, True])
def test_fit_recovers_the_unit_costs(path, params, shared):
    rows = _rows(params, path, 2, shared)
    got = fit_params(rows, 2)
    for k, v in params.as_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6), k
    assert max(map(abs, rel_errors(got, 2, rows))) < 1e-6


def test_fit_rejects_mixed_paths_and_nothing():
    rows = _rows(BOARD, "board", 2, False) + _rows(SOCK, "socket", 2, False)
    with pytest.raises(ValueError, match="one path"):
        fit_params(rows, 2)
    with pytest.raises(ValueError):
        fit_params([], 2)


def test_nnls_keeps_coefficients_non_negative():
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([3.0, 2.0, 1.0])            # unconstrained: slope -1
    x = nnls(a, b)
    assert (x >= 0).all() and x[1] == 0 and x[0] == pytest.approx(2.0)


def test_flat_ring_at_scale_is_the_closed_form():
    c = Cluster(hosts=128, per_host=8, link_bps=10e9, wire=10e-6)
    n, m = c.ranks, float(1 << 30)
    chunk = m / n                                  # 1 MiB: one segment a step
    step = SOCK.alpha + c.wire + chunk * max(SOCK.beta, 8 / c.link_bps)
    want = SOCK.a0 + 2 * (n - 1) * step + (n - 1) / n * m * SOCK.gamma
    assert at_scale("all_reduce", BOARD, SOCK, c, 1 << 30)["ring"] == pytest.approx(want)


def test_recursive_doubling_shares_the_nic_across_hosts():
    c = Cluster(hosts=128, per_host=8, link_bps=10e9, wire=0.0)
    m = 1 << 20
    rd = at_scale("all_reduce", BOARD, SOCK, c, m)["rd"]
    intra = 3 * (SOCK.alpha + m * SOCK.beta)
    inter = 7 * (SOCK.alpha + m * 8 * 8 / c.link_bps)    # 8 ranks on one 10 Gb/s link
    assert rd == pytest.approx(SOCK.a0 + intra + inter + 10 * m * SOCK.gamma)


def test_one_host_hierarchy_is_the_board():
    c = Cluster(hosts=1, per_host=8, link_bps=10e9)
    t = at_scale("all_reduce", BOARD, SOCK, c, MIB)["hier"]
    want = (BOARD.time(terms("board", "reduce", 8, MIB))
            + BOARD.time(terms("board", "broadcast", 8, MIB)))
    assert t == pytest.approx(want)


def test_crossovers_latency_then_bandwidth():
    c = Cluster(hosts=128, per_host=8, link_bps=10e9)
    small = at_scale("all_reduce", BOARD, SOCK, c, 8)
    large = at_scale("all_reduce", BOARD, SOCK, c, 1 << 30)
    assert small["ring"] > 10 * min(small.values())         # 2046 latencies
    assert best(large) in ("ring", "hier", "hier_rs")
    assert large["rd"] > large["ring"]
    for op in ("broadcast", "all_gather"):
        for size in (8, 1 << 30):
            assert all(math.isfinite(t) and t > 0
                       for t in at_scale(op, BOARD, SOCK, c, size).values())
    with pytest.raises(ValueError):
        at_scale("gather", BOARD, SOCK, c, 8)


def test_parse_link_and_cluster():
    assert parse_link("10gbit") == 10e9
    assert parse_link("100Gbit") == 100e9
    assert parse_link("2.5gbit") == 2.5e9
    assert parse_link("1e9") == 1e9
    with pytest.raises(ValueError):
        Cluster(hosts=0, per_host=8, link_bps=10e9)


def test_store_round_trip_and_predict_cli(tmp_path, capsys):
    fit = Fit({"board": BOARD, "socket": SOCK}, 2, [{"path": "board", "op": "all_reduce",
                                                    "n": 2, "bytes": 8, "t": 1e-4}])
    p = save(fit, tmp_path / "fit.json")
    back, where = load(p)
    assert where == p and back == fit
    assert json.loads(p.read_text())["cores"] == 2
    assert main(["--predict", "--ranks", "1024", "--hosts", "128", "--link", "100gbit",
                 "--params", str(p), "--sizes", "8,1G"]) == 0
    out = capsys.readouterr().out
    assert "| 1 GiB |" in out and "crossovers" in out
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _rows(SOCK, "socket", 2, True)
                            + _rows(BOARD, "board", 2, True)))
    assert main(["--fit", "--from", str(rows), "--out", str(tmp_path / "f2.json")]) == 0
    assert main(["--check", "--from", str(rows), "--params", str(tmp_path / "f2.json")]) == 0
    assert "100% of rows within 20%" in capsys.readouterr().out
    assert main(["--check", "--from", str(tmp_path / "f2.json"), "--params",
                 str(tmp_path / "f2.json"), "--markdown"]) == 0     # a fit's own rows
    out = capsys.readouterr().out
    assert "board path, us" in out and "| all_reduce | 16 MiB |" in out


def _both(sizes: tuple) -> list[dict]:
    return _rows(BOARD, "board", 2, True, sizes) + _rows(SOCK, "socket", 2, True, sizes)


def test_fit_check_from_saved_rows_fits_the_fit_sizes_reports_the_held_out(tmp_path, capsys):
    rows = _both(FIT_SIZES) + _both(CHECK_SIZES)
    fit_rows, held = split(rows)
    assert {r["size"] for r in fit_rows} == set(FIT_SIZES)
    assert {r["size"] for r in held} == set(CHECK_SIZES)
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fit.json"
    assert main(["--fit-check", "--from", str(src), "--out", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert text.count("100% of rows within 20%") == 2
    # per world size: the median signed error, and in brackets the median |error|
    assert len(re.findall(r"by ranks (\d+: [+-]0% \(0%\)(, )?)+$", text, re.M)) == 2
    assert "| all_reduce | 8 MiB |" in text and "| all_reduce | 16 MiB |" not in text
    fit, _ = load(out)
    assert {r["size"] for r in fit.rows} == set(FIT_SIZES)        # the held-out rows are not in it
    assert fit.params["socket"].kappa == pytest.approx(SOCK.kappa, rel=1e-6)
    src.write_text("".join(json.dumps(r) + "\n" for r in fit_rows))
    with pytest.raises(SystemExit, match="held out"):
        main(["--fit-check", "--from", str(src), "--out", str(out)])


def test_fit_check_measures_fit_and_held_out_sizes_in_the_same_jobs(tmp_path, monkeypatch, capsys):
    import collectives.tools.sweep as sweep
    jobs = []

    def measure(path, n, sizes, rounds):
        jobs.append((path, n, tuple(sizes)))
        return [r for r in _rows(BOARD if path == "board" else SOCK, path, 2, True, tuple(sizes))
                if r["n"] == 2]
    monkeypatch.setattr(sweep, "measure", measure)
    save_to = tmp_path / "rows.jsonl"
    assert main(["--fit-check", "--ranks", "2", "--trials", "2", "--rounds", "1",
                 "--save", str(save_to), "--out", str(tmp_path / "fit.json")]) == 0
    assert [j[:2] for j in jobs] == [("board", 2), ("socket", 2)] * 2
    for _, _, sizes in jobs:      # one job: every size, fit and held out alternating
        assert sorted(sizes) == sorted(FIT_SIZES + CHECK_SIZES)
        assert [s in FIT_SIZES for s in sizes] == [i % 2 == 0 for i in range(len(sizes))]
    assert len(save_to.read_text().splitlines()) == 2 * 2 * 3 * 12     # every trial's rows
    assert capsys.readouterr().out.count("100% of rows within 20%") == 2


def test_tables_into_a_document_replace_only_the_generated_part(tmp_path, capsys):
    p = save(Fit({"board": BOARD, "socket": SOCK}, 2, note="made up"), tmp_path / "fit.json")
    doc = tmp_path / "scale.md"
    doc.write_text(f"# head\n\n{TABLES_BEGIN}\nold\n{TABLES_END}\n\ntail\n")
    args = ["--predict", "--tables", "--params", str(p), "--into", str(doc)]
    assert main(args) == 0
    text = doc.read_text()
    assert text.startswith("# head\n") and text.endswith(f"{TABLES_END}\n\ntail\n")
    assert "old" not in text and "made up" in text and "128 hosts of 8" in text
    for op in ("all_reduce", "broadcast", "all_gather"):
        for link in ("10", "100"):
            assert f"### {op}, {link} Gb/s" in text
    assert "| all_reduce | rd up to " in text
    assert main(args) == 0 and doc.read_text() == text            # the same again
    doc.write_text("no marks\n")
    with pytest.raises(SystemExit, match="generated"):
        main(args)
