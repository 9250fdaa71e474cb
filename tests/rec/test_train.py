"""Training: no leakage of held-out items, determinism, checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.train import (
    PrefixRepeats,
    _param_groups,
    TrainConfig,
    TrainingWindows,
    _ce_loss,
    _mixture_sampled_loss,
    _proposal_log_q,
    _sampled_softmax_loss,
    load_checkpoint,
    save_checkpoint,
    train,
)


def sequences(rows: list[list[int]] | list[np.ndarray], n_items: int) -> SequenceData:
    """SequenceData from per-user item lists (time order), one behaviour, no categories."""
    items = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows])
    n = len(items)
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
        items=items,
        behaviors=np.ones(n, dtype=np.int8),
        categories=np.zeros(n, dtype=np.int32),
        timestamps=np.arange(n, dtype=np.int64),
        n_items=n_items,
        n_categories=0,
        item_ids=np.arange(-1, n_items, dtype=np.int64),
        user_ids=np.arange(len(rows), dtype=np.int64),
        item_category=np.zeros(n_items + 1, dtype=np.int32),
    )


def make_data(n_users: int = 60, n_items: int = 30, seed: int = 0) -> SequenceData:
    """Hand-built sequences with a learnable pattern: each user walks items i, i+1, i+2, ..."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 12, size=n_users)
    starts = rng.integers(1, n_items + 1, size=n_users)
    return sequences([(s - 1 + np.arange(n)) % n_items + 1 for s, n in zip(starts, lengths)], n_items)


def test_training_windows_hold_no_held_out_items() -> None:
    data = make_data()
    split = leave_last_out(data, max_len=20)
    windows = TrainingWindows.from_split(split, max_len=20)
    for u in range(data.n_users):
        events = data.items[data.offsets[u] : data.offsets[u + 1]]
        train_part = events[:-2]
        row_in, row_out = windows.inputs[u], windows.targets[u]
        assert list(row_in[row_in != 0]) == list(train_part[:-1])
        assert list(row_out[row_in != 0]) == list(train_part[1:])


def test_proposal_log_q() -> None:
    counts = np.array([0, 3, 1, 0])  # padding, then items with 3, 1 and 0 training events
    popularity = _proposal_log_q(counts, "popularity").exp()
    uniform = _proposal_log_q(counts, "uniform").exp()
    mixed = _proposal_log_q(counts, "mixed").exp()
    torch.testing.assert_close(popularity, torch.tensor([0.0, 4 / 7, 2 / 7, 1 / 7]))  # add-one counts
    torch.testing.assert_close(uniform, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(mixed, (popularity + uniform) / 2)
    with pytest.raises(NimbleError, match="negatives_from"):
        _proposal_log_q(counts, "hard")


@pytest.mark.parametrize(
    ("loss", "negatives_from", "bce_weight"),
    [("ce", "popularity", 0.0), ("sampled_softmax", "mixed", 0.0), ("bce", "popularity", 0.0),
     ("ce", "popularity", 0.5), ("sampled_softmax", "mixed", 0.5)],
)  # fmt: skip
def test_train_is_deterministic_and_learns(loss: str, negatives_from: str, bce_weight: float) -> None:
    data = make_data()
    config = TrainConfig(
        epochs=4, batch_size=16, lr=5e-3, loss=loss, n_negatives=10, negatives_from=negatives_from,
        bce_weight=bce_weight, patience=10, threads=1,
    )  # fmt: skip
    results = []
    for _ in range(2):
        torch.manual_seed(123)  # model init
        model = SeqRec(SeqRecConfig.small(data.n_items, max_len=20, dropout=0.0))
        results.append((train(model, data, config), model.item_emb.weight.detach().clone()))
    (first, w1), (second, w2) = results
    torch.testing.assert_close(w1, w2)
    assert first.history == [{**r, "seconds": h["seconds"]} for r, h in zip(second.history, first.history)]
    assert first.epochs_run == 4 and 1 <= first.best_epoch <= 4
    assert first.best_valid["ndcg@10"] > 0.0


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(30, max_len=20, use_category=True, n_categories=4)).eval()
    model.set_item_category(torch.arange(31) % 5)
    save_checkpoint(model, {"note": "test"}, tmp_path)
    loaded = load_checkpoint(tmp_path)
    history = torch.randint(0, 31, (4, 20))
    torch.testing.assert_close(loaded.score_all(history), model.score_all(history), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_load_checkpoint_missing(tmp_path) -> None:
    with pytest.raises(NimbleError, match="not found"):
        load_checkpoint(tmp_path)


def test_train_rejects_mismatched_model() -> None:
    with pytest.raises(NimbleError, match="items"):
        train(SeqRec(SeqRecConfig.small(5)), make_data(), TrainConfig(epochs=1))


def test_sampled_validation_metrics_are_logged_on_a_large_catalogue() -> None:
    data = make_data(n_users=40, n_items=300)
    config = TrainConfig(epochs=1, batch_size=16, loss="ce", patience=5, threads=1)
    torch.manual_seed(0)
    result = train(SeqRec(SeqRecConfig.small(data.n_items, max_len=20)), data, config)
    row = result.history[0]
    assert 0.0 <= row["valid_sampled100_ndcg@10"] <= row["valid_sampled100_hr@10"] <= 1.0
    assert row["valid_sampled100_hr@10"] >= row["valid_hr@10"]  # 100 negatives are easier than all items


def test_prefix_repeats_known_answer() -> None:
    inputs = torch.tensor([[0, 5, 7, 5, 9]])
    repeats = PrefixRepeats.from_inputs(inputs, inputs != 0)
    # at each trained position, columns holding the latest occurrence so far: events since seen
    expected = [[0, 1, 0, 0, 0], [0, 2, 1, 0, 0], [0, 0, 2, 1, 0], [0, 0, 3, 2, 1]]
    np.testing.assert_array_equal(repeats.recency.numpy(), expected)
    # and how often that item occurred in columns 0..t (item 5: once, then twice from column 3)
    counts = [[0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 2, 0], [0, 0, 1, 2, 1]]
    np.testing.assert_array_equal(repeats.count.numpy(), counts)
    assert (repeats.items == inputs).all() and repeats.decayed is None
    # Σ 0.5^(t - q) over that item's columns q <= t (item 5 at t = 3: 0.5^0 + 0.5^2)
    decayed = PrefixRepeats.from_inputs(inputs, inputs != 0, torch.tensor(0.5)).decayed
    expected = [[0, 1, 0, 0, 0], [0, 0.5, 1, 0, 0], [0, 0, 0.5, 1.25, 0], [0, 0, 0.25, 0.625, 1]]
    np.testing.assert_allclose(decayed.numpy(), expected)


def test_training_logits_with_repeats_equal_the_served_scores() -> None:
    """What the loss sees at a row's last position is what score_all gives for that row
    (earlier positions sit at other position embeddings, so only the last is comparable)."""
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(20, repeat_scores=True, repeat_counts=True, repeat_decay=True)).eval()
    with torch.no_grad():
        model.repeat_recency.weight.normal_()
        model.repeat_count.weight.normal_()
        model.repeat_decay_weight.fill_(2.0)
        inputs = torch.tensor([[0, 0, 3, 4, 3, 3, 8, 4], [1, 2, 3, 1, 2, 3, 1, 2]])
        mask = inputs != 0
        repeats = PrefixRepeats.from_inputs(inputs, mask, model.decay_gamma())
        states = model.encode(inputs)[mask]
        logits = (states @ model.item_emb.weight.T).scatter_add(1, repeats.items, repeats.bonus(model, states))
        last = torch.cumsum(mask.flatten(), 0).view(2, 8)[:, -1] - 1  # row of each user's last position
        served = model.score_all(inputs)
        torch.testing.assert_close(logits[last, 1:], served[:, 1:], rtol=1e-5, atol=1e-5)
        assert (served[:, 3] != (model.last_state(inputs) @ model.item_emb.weight.T)[:, 3]).all()  # item 3 was seen
        candidates = torch.tensor([[3, 4, 8, 9], [1, 2, 3, 9]])
        picked = model.score_candidates(model.last_state(inputs), inputs, candidates)
        torch.testing.assert_close(picked, served.gather(1, candidates))  # the serving path agrees


def test_sampled_softmax_with_repeats_tends_to_the_full_softmax() -> None:
    """With many negatives the sampled loss and its repeat-parameter gradients match the
    full-catalogue cross-entropy (history items exact, their sampled copies taken out)."""
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(20, repeat_scores=True, repeat_counts=True, repeat_decay=True)).eval()
    with torch.no_grad():
        model.repeat_recency.weight.normal_()
        model.repeat_count.weight.normal_()
    inputs = torch.tensor([[0, 0, 3, 4, 3, 3, 8, 4], [1, 2, 3, 1, 2, 3, 1, 2]])
    targets = torch.tensor([[0, 0, 4, 3, 3, 8, 4, 9], [2, 3, 1, 2, 3, 1, 2, 3]])
    mask = inputs != 0

    def loss_and_grads(full: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        hidden = model.encode(inputs)
        repeats = PrefixRepeats.from_inputs(inputs, mask, model.decay_gamma())
        if full:
            loss = _ce_loss(model, hidden[mask], targets[mask], 256, repeats)
        else:
            seen_dots = torch.bmm(hidden, model.item_emb(inputs).transpose(1, 2))[mask]
            loss = _sampled_softmax_loss(model, hidden[mask], targets[mask], 200_000, _proposal_log_q(np.ones(21), "uniform"),
                                         torch.Generator().manual_seed(0), repeats, seen_dots)  # fmt: skip
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for n, p in model.named_parameters() if n.startswith("repeat_")]

    full_loss, full_grads = loss_and_grads(full=True)
    sampled_loss, sampled_grads = loss_and_grads(full=False)
    assert sampled_loss == pytest.approx(full_loss, abs=2e-3)
    for full, sampled in zip(full_grads, sampled_grads):
        torch.testing.assert_close(sampled, full, atol=2e-3, rtol=0)


MIXTURE = dict(repeat_scores=True, repeat_counts=True, repeat_decay=True, repeat_mode="mixture")


def _mixture_model() -> SeqRec:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(20, **MIXTURE)).eval()
    with torch.no_grad():
        model.repeat_recency.weight.normal_()
        model.repeat_count.weight.normal_()
        model.repeat_decay_weight.fill_(2.0)
        model.repeat_share_weight.fill_(1.5)
        model.mixture_query.weight.add_(0.3 * torch.randn_like(model.mixture_query.weight))
    return model


def _mixture_repeats(model: SeqRec, inputs: torch.Tensor, hidden: torch.Tensor) -> PrefixRepeats:
    mask = inputs != 0
    repeats = PrefixRepeats.from_inputs(inputs, mask, model.decay_gamma())
    repeats.dots = torch.bmm(model.mixture_query(hidden), model.item_emb(inputs).transpose(1, 2))[mask]
    return repeats


def test_mixture_training_log_probs_equal_the_served_scores() -> None:
    """The mixture's training log-probabilities at a row's last position are score_all's for
    that row (same gate features, same history columns), and sum to 1 over the catalogue."""
    model = _mixture_model()
    inputs = torch.tensor([[0, 0, 3, 4, 3, 3, 8, 4], [1, 2, 3, 1, 2, 3, 1, 2]])
    mask = inputs != 0
    with torch.no_grad():
        hidden = model.encode(inputs)
        repeats = _mixture_repeats(model, inputs, hidden)
        states = hidden[mask]
        log_probs = model.mixture_log_probs(states, states @ model.item_emb.weight.T, repeats.items, repeats.recency,
                                            repeats.count, repeats.decayed, repeats.dots, repeats.share)  # fmt: skip
        torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(len(states)))
        last = torch.cumsum(mask.flatten(), 0).view(2, 8)[:, -1] - 1
        served = model.score_all(inputs)
        torch.testing.assert_close(log_probs[last, 1:], served[:, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(repeats.share[last].numpy(), [3 / 6, 5 / 8])  # events whose item came earlier


def test_mixture_sampled_loss_tends_to_the_full_softmax() -> None:
    """With many negatives the mixture's sampled loss and its gradients match its exact NLL."""
    model = _mixture_model()
    inputs = torch.tensor([[0, 0, 3, 4, 3, 3, 8, 4], [1, 2, 3, 1, 2, 3, 1, 2]])
    targets = torch.tensor([[0, 0, 4, 3, 3, 8, 4, 9], [2, 3, 1, 2, 3, 1, 2, 11]])  # novel and repeat targets
    mask = inputs != 0

    def loss_and_grads(full: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        hidden = model.encode(inputs)
        repeats = _mixture_repeats(model, inputs, hidden)
        if full:
            loss = _ce_loss(model, hidden[mask], targets[mask], 5, repeats)  # several chunks
        else:
            seen_dots = torch.bmm(hidden, model.item_emb(inputs).transpose(1, 2))[mask]
            loss = _mixture_sampled_loss(model, hidden[mask], targets[mask], 200_000, _proposal_log_q(np.ones(21), "uniform"),
                                         torch.Generator().manual_seed(0), repeats, seen_dots)  # fmt: skip
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for n, p in model.named_parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads(full=True)
    sampled_loss, sampled_grads = loss_and_grads(full=False)
    assert sampled_loss == pytest.approx(full_loss, abs=2e-3)
    assert len(full_grads) == len(sampled_grads)
    for full, sampled in zip(full_grads, sampled_grads):
        torch.testing.assert_close(sampled, full, atol=3e-3, rtol=0)


@pytest.mark.parametrize("loss", ["ce", "sampled_softmax"])
def test_mixture_trains(loss: str) -> None:
    data = make_data()
    for u in range(0, data.n_users, 2):  # half the users revisit their first item
        data.items[data.offsets[u] + 2] = data.items[data.offsets[u]]
    model = SeqRec(SeqRecConfig.small(data.n_items, **MIXTURE))
    learnt = [model.repeat_gate.weight, model.repeat_share_weight, model.mixture_query.weight, model.repeat_recency.weight]
    before = [p.detach().clone() for p in learnt]
    result = train(model, data, TrainConfig(epochs=1, batch_size=16, loss=loss, n_negatives=16, threads=1))
    assert 0.0 <= result.best_valid["ndcg@10"] <= 1.0
    for old, new in zip(before, learnt):
        assert not torch.equal(old, new) and torch.isfinite(new).all()


@pytest.mark.parametrize("loss", ["ce", "sampled_softmax"])
def test_repeat_scores_train_and_learn_the_bonus(loss: str) -> None:
    data = make_data()
    model = SeqRec(SeqRecConfig.small(data.n_items, repeat_scores=True, repeat_counts=True, repeat_decay=True))
    learnt = [model.repeat_recency.weight, model.repeat_count.weight, model.repeat_decay_logit, model.repeat_decay_weight]
    before = [p.detach().clone() for p in learnt]
    train(model, data, TrainConfig(epochs=1, batch_size=16, loss=loss, n_negatives=16, threads=1))
    for old, new in zip(before, learnt):
        assert not torch.equal(old, new) and torch.isfinite(new).all()
    with pytest.raises(NimbleError, match="bce"):
        train(model, data, TrainConfig(epochs=1, loss="bce"))


def test_min_steps_per_epoch_repeats_a_small_log(monkeypatch) -> None:
    data = make_data(n_users=20)  # 20 users, batch 16: 2 batches per pass
    steps = []
    original = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    model = SeqRec(SeqRecConfig.small(data.n_items, max_len=20))
    train(model, data, TrainConfig(epochs=2, batch_size=16, threads=1, min_steps_per_epoch=5, patience=10))
    assert len(steps) == 2 * 3 * 2  # 2 epochs of ceil(5 / 2) = 3 passes of 2 batches
    steps.clear()
    train(model, data, TrainConfig(epochs=2, batch_size=16, threads=1, patience=10))
    assert len(steps) == 2 * 2  # default: one pass


def test_plateau_lowers_the_rate_after_flat_validation(monkeypatch) -> None:
    from nimbleml.rec import train as train_module
    from nimbleml.rec.evaluate import RankingResult

    flat = RankingResult("full", 10, {"hr@10": 0.5, "ndcg@10": 0.25, "mrr": 0.2})
    monkeypatch.setattr(train_module, "evaluate_full", lambda *args, **kwargs: flat)
    data = make_data(n_users=20)
    model = SeqRec(SeqRecConfig.small(data.n_items, max_len=20))
    config = TrainConfig(epochs=6, batch_size=16, lr=1e-3, threads=1, patience=10, lr_plateau_factor=0.5)
    result = train(model, data, config)
    # epoch 1 sets the best; epochs 2 and 3 do not beat it -> halved for epoch 4; 4 and 5 -> again
    assert [row["lr"] for row in result.history] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    off = train(model, data, TrainConfig(epochs=3, batch_size=16, lr=1e-3, threads=1, patience=10))
    assert [row["lr"] for row in off.history] == [1e-3] * 3
    with pytest.raises(NimbleError, match="lr_plateau_factor"):
        train(model, data, TrainConfig(epochs=1, threads=1, lr_plateau_factor=0.0))


def test_ema_weights_are_validated_and_kept(monkeypatch) -> None:
    data = make_data(n_users=20)
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(data.n_items, max_len=20))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    after_steps: list[dict[str, torch.Tensor]] = []
    decay = 0.9
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):  # the weights after each step
        out = original(self, *args, **kwargs)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        weights["item_emb.weight"][0] = 0.0  # the padding row is zeroed after every step
        after_steps.append(weights)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(model, data, TrainConfig(epochs=1, batch_size=4, threads=1, ema_decay=decay))
    n = len(after_steps)
    assert n == 5
    # the bias-corrected average: weights decay^(n-1-i) over the n steps' weights, normalised;
    # the random initialisation has no weight in it (it had decay^n = 59% here before)
    coefficients = torch.tensor([decay ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
    coefficients /= coefficients.sum()
    for name in names:
        expected = sum(float(c) * w[name] for c, w in zip(coefficients, after_steps))
        kept = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(kept, expected, rtol=1e-5, atol=1e-6)
    final_bias = dict(model.named_parameters())["ln_final.bias"].detach()
    assert not torch.allclose(final_bias, initial["ln_final.bias"])  # the steps moved it off its start
    with pytest.raises(NimbleError, match="ema_decay"):
        train(model, data, TrainConfig(epochs=1, ema_decay=1.0))


def test_repeat_lr_puts_the_repeat_parameters_in_their_own_group() -> None:
    model = SeqRec(SeqRecConfig.small(30, repeat_scores=True, repeat_counts=True, repeat_decay=True))
    (everything,) = _param_groups(model, TrainConfig())
    assert len(everything["params"]) == len(list(model.parameters()))
    rest, repeat = _param_groups(model, TrainConfig(repeat_lr=0.01, weight_decay=0.1))
    assert repeat["lr"] == 0.01 and repeat["weight_decay"] == 0.0 and "lr" not in rest
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in repeat["params"]) == [
        "repeat_count.weight", "repeat_decay_logit", "repeat_decay_weight", "repeat_gate.bias",
        "repeat_gate.weight", "repeat_recency.weight",
    ]
    assert len(rest["params"]) + 6 == len(list(model.parameters()))
    with pytest.raises(NimbleError, match="repeat_lr"):
        train(model, make_data(), TrainConfig(epochs=1, repeat_lr=0.0))
