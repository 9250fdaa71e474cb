"""The bench harness: interleaved rounds, median intervals, the tie rule, attention FLOPs, threads.

Nothing here times anything for its own sake: the rows are measured on stand-in predicts and only
the bookkeeping is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nimbleml.bench.harness import (BenchConfig, Candidate, Estimate, attention_flop_mapping, flops_per_call,
                                    measure_rows, physical_cores, round_robin, winner)
from nimbleml.rec.model import Block, SeqRecConfig


def test_round_robin_visits_every_row_once_per_round_in_turn() -> None:
    assert round_robin(3, 2) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def _tiny_config() -> BenchConfig:
    return BenchConfig(warmup=1, rounds=5, latency_runs=2, latency_seconds=0.0, batch_sizes=(1, 4),
                       throughput_seconds=0.0, min_calls=2, input_pool=2)


def test_rows_are_timed_interleaved_on_the_same_requests() -> None:
    calls: list[tuple[str, int]] = []

    def make_inputs(batch: int, counter=iter(range(10_000))) -> dict[str, np.ndarray]:
        return {"x": np.full((batch, 1), next(counter))}

    def candidate(name: str) -> Candidate:
        return Candidate(name, "stub", lambda: (lambda inputs: calls.append((name, int(inputs["x"][0, 0])))),
                         0.0, 0.0, 10, threads={"torch_intra_op": 1})

    config = _tiny_config()
    rows = measure_rows([candidate("a"), candidate("b")], make_inputs, config, 1.0, server=(3, make_inputs),
                        server_batch={"max_batch_size": 3, "group_window": 4})
    warm = 2 * (config.warmup + 2 * (len(config.batch_sizes) + 1))
    timed = calls[warm:]
    per_round = len(timed) // (2 * config.rounds)
    order = [timed[i][0] for i in range(0, len(timed), per_round)]
    assert order == ["a", "b"] * config.rounds  # a, b, a, b, ...: never a's rounds back to back
    # both rows saw the same requests in the same order
    assert [x for n, x in timed if n == "a"] == [x for n, x in timed if n == "b"]
    for row in rows:
        assert row.p50.n == row.throughput.n == row.server.n == config.rounds
        assert row.throughput.ci95[0] <= row.throughput.median <= row.throughput.ci95[1]
        assert row.threads == {"torch_intra_op": 1}
        d = row.to_dict()
        assert set(d["throughput_rps"]) >= {"median", "ci95"} and set(d["p50_ms"]) >= {"median", "ci95"}
        assert d["server_batch"] == {"max_batch_size": 3, "group_window": 4} and d["throughput_rps_server"]["n"] == 5


def test_median_interval_is_the_order_statistic_interval() -> None:
    five = Estimate.of([5, 1, 4, 2, 3])
    assert five.median == 3 and five.ci95 == (1, 5) and five.coverage == pytest.approx(1 - 2 / 32)
    twelve = Estimate.of(range(1, 13))  # P(Bin(12, 1/2) <= 2) = 79/4096: [x(3), x(10)] covers 96.1%
    assert twelve.ci95 == (3, 10) and twelve.coverage == pytest.approx(1 - 2 * 79 / 4096)
    assert Estimate.of([7.0]).ci95 == (7.0, 7.0)


def test_winner_only_where_the_interval_clears_the_runner_up() -> None:
    clear = {"fast": Estimate.of([10, 11, 12, 11, 10]), "slow": Estimate.of([7, 8, 9, 8, 8])}
    assert winner(clear) == "fast"
    overlap = {"fast": Estimate.of([9, 11, 12, 11, 10]), "slow": Estimate.of([7, 8, 9.5, 8, 8])}
    assert winner(overlap) == "tie"
    latency = {"quick": Estimate.of([1.0, 1.1, 1.2]), "sluggish": Estimate.of([2.0, 2.1, 2.2])}
    assert winner(latency, higher_is_better=False) == "quick"
    assert winner({"only": Estimate.of([1.0])}) == "only"


def test_attention_flops_of_one_block_match_a_hand_count() -> None:
    config = SeqRecConfig.small(n_items=50)
    block = Block(config).eval()
    batch, length, dim = 3, 20, config.dim
    heads, head = config.heads(0), config.head_width
    inner, ffn = heads * head, config.ffn_width(0)
    x = torch.randn(batch, length, dim)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length)
    hand = (2 * batch * length * dim * inner * 3  # Q, K, V projections
            + 2 * batch * heads * length * length * head * 2  # Q K^T and weights x V
            + 2 * batch * length * inner * dim  # output projection
            + 2 * batch * length * dim * ffn * 2)  # the two FFN layers
    assert flops_per_call(block, {"x": x, "allowed": allowed}) == hand
    assert attention_flop_mapping(), "torch now has its own formula: drop the custom mapping"


def test_physical_cores_counts_core_ids_not_hyperthreads() -> None:
    text = "".join(f"processor : {i}\nphysical id : 0\ncore id : {i % 2}\n\n" for i in range(4))
    assert physical_cores(text) == 2
