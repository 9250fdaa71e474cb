"""Compression recipes on a tiny recommender: every recipe writes a folder that loads, int8
recipes write a quantised graph, chains work, conversions start from the trained weights,
and a folder with a missing or corrupt file gives one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.compression import (
    RECIPES,
    CompressConfig,
    _rebuilt,
    _svd_init,
    compress_model,
    inherit_repeat_terms,
    load_variant,
    serving_inputs,
    student_config,
)
from nimbleml.runtime.export import has_dynamic_axis
from nimbleml.rec.model import SeqRec, SeqRecConfig, ServingRanker
from nimbleml.rec.train import TrainConfig, save_checkpoint
from tests.rec.test_train import make_data

N_ITEMS = 80


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compress")
    make_data(n_users=60, n_items=N_ITEMS).save(root / "data")
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=16, n_blocks=2, exclude_history=True))
    train = TrainConfig(loss="sampled_softmax", n_negatives=16, batch_size=32, negatives_from="mixed")
    save_checkpoint(model, {"preset": "test", "train": train.to_dict()}, root / "model")
    return root / "model", root / "data"


CONFIG = CompressConfig(
    finetune_seconds=0, prune_rounds=2, head_rank=4, qkv_groups=2, attention_window=4, n_global=1,
    distill_seconds=0, calibration_users=32, calibration_batch=16, valid_users=60, finetune_valid_users=60,
)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_writes_a_folder_that_loads(parent, tmp_path, recipe: str) -> None:
    model_dir, data_dir = parent
    out = compress_model(model_dir, data_dir, [recipe], tmp_path / recipe, CONFIG)
    model, variant, onnx_path = load_variant(out)
    assert variant["recipes"] == [recipe] and variant["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert set(variant["valid_before"]) >= {"hr@10", "ndcg@10", "mrr"} and variant["valid_after"]["n_users"] == 60
    assert variant["steps"][0]["seconds"] >= 0 and "environment" in variant
    inputs = {"history": torch.randint(0, N_ITEMS + 1, (3, 16)), "candidates": torch.randint(1, N_ITEMS + 1, (3, 50))}
    scores = model(**inputs)
    assert scores.shape == (3, 50) and not torch.isnan(scores).any()
    if RECIPES[recipe].int8:
        assert variant["precision"] == "int8" and onnx_path == out / "model.onnx"
        assert variant["steps"][0]["max_weight_error_steps"] <= 0.5 + 1e-3
        # the int8 graph takes any number of candidates: `bench rec` scores the whole catalogue through it
        from nimbleml.runtime.backends import get_backend

        assert has_dynamic_axis(onnx_path, "candidates", 1)
        history = np.random.default_rng(0).integers(0, N_ITEMS + 1, (2, 100))
        catalogue = np.tile(np.arange(1, N_ITEMS + 1), (2, 1))
        assert get_backend("onnxruntime").load(onnx_path).predict(
            serving_inputs(model.config, history, catalogue, None)).shape == (2, N_ITEMS)
    else:
        assert variant["precision"] == "fp32" and onnx_path is None
    if recipe == "prune":
        assert [r["sparsity"] for r in variant["steps"][0]["rounds"]] == pytest.approx([0.2, 0.4], abs=0.01)
        assert variant["params"]["nonzero"] < 0.7 * variant["params"]["total"]
    if recipe == "prune-structured":
        assert model.config.block_heads == [1, 1] and model.config.block_ffn == [32, 32]
        assert variant["params"]["total"] < variant["parent_params"]["total"]
    if recipe == "distill":
        assert variant["params"]["total"] < 0.45 * variant["parent_params"]["total"]


def test_chain_distill_then_int8(parent, tmp_path) -> None:
    model_dir, data_dir = parent
    out = compress_model(model_dir, data_dir, ["distill", "quantize-static"], tmp_path / "chain", CONFIG)
    model, variant, onnx_path = load_variant(out)
    assert variant["precision"] == "int8" and onnx_path is not None
    assert model.config.dim < 32 and [s["recipe"] for s in variant["steps"]] == ["distill", "quantize-static"]
    with pytest.raises(NimbleError, match="already int8"):
        compress_model(out, data_dir, ["local"], tmp_path / "again", CONFIG)
    # a float compressed folder can be compressed again; its variant lists every recipe since training
    local = compress_model(model_dir, data_dir, ["local"], tmp_path / "local", CONFIG)
    again = compress_model(local, data_dir, ["quantize-dynamic"], tmp_path / "again", CONFIG)
    assert load_variant(again)[1]["recipes"] == ["local", "quantize-dynamic"]


@pytest.mark.parametrize("chain", [["quantize-static", "prune"], ["qat", "quantize-dynamic"], ["nope"], []])
def test_bad_chains_are_refused(parent, tmp_path, chain: list[str]) -> None:
    with pytest.raises(NimbleError, match="recipe"):
        compress_model(*parent, chain, tmp_path / "bad", CONFIG)


def test_full_rank_svd_conversion_is_exact() -> None:
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=16, n_blocks=2)).eval()
    rank = model.config.head_width
    low = _rebuilt(model, head_rank=rank).eval()
    with torch.no_grad():
        energy = [_svd_init(getattr(a.attn, n), getattr(b.attn, n), 2, rank)
                  for a, b in zip(model.blocks, low.blocks) for n in "qkv"]
    assert energy == pytest.approx([1.0] * 6)
    history, candidates = torch.randint(0, N_ITEMS + 1, (4, 16)), torch.randint(1, N_ITEMS + 1, (4, 50))
    torch.testing.assert_close(ServingRanker(low)(history, candidates), model(history, candidates), atol=1e-4, rtol=1e-4)


def test_student_is_about_a_fifth_of_the_teacher() -> None:
    teacher = SeqRec(SeqRecConfig(n_items=5000))
    student = SeqRec(student_config(teacher, 0.2))
    ratio = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert 0.15 < ratio < 0.25 and student.config.n_blocks == teacher.config.n_blocks


def test_missing_or_corrupt_files_give_one_clear_error(parent, tmp_path) -> None:
    model_dir, data_dir = parent
    out = compress_model(model_dir, data_dir, ["quantize-dynamic"], tmp_path / "q", CONFIG)
    (out / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(NimbleError, match="model.onnx"):
        load_variant(out)
    (out / "model.onnx").unlink()
    with pytest.raises(NimbleError, match="model.onnx"):
        load_variant(out)
    (out / "variant.json").write_text("{")
    with pytest.raises(NimbleError, match="variant.json"):
        load_variant(out)
    config = (out / "config.json").read_text()
    (out / "config.json").write_text(json.dumps({"model": {"n_items": "many"}}))
    with pytest.raises(NimbleError, match="config.json"):
        load_variant(out)
    (out / "config.json").write_text(config)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(NimbleError, match="model.safetensors"):
        load_variant(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(NimbleError, match="model.safetensors"):
        load_variant(out)


def test_compress_command(parent, tmp_path, capsys) -> None:
    from nimbleml.cli import main

    model_dir, data_dir = parent
    out = tmp_path / "cli"
    argv = ["compress", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--recipe", "local", "--recipe", "quantize-dynamic", "--finetune-seconds", "0"]
    assert main(argv) == 0
    assert "NDCG@10" in capsys.readouterr().out
    assert json.loads((out / "variant.json").read_text())["recipes"] == ["local", "quantize-dynamic"]
    assert main([*argv, "--recipe", "prune"]) == 2  # int8 recipe not last: one-line error, exit 2
    assert "int8 recipes must come last" in capsys.readouterr().err


def test_user_subset_keeps_each_users_split(parent) -> None:
    from nimbleml.rec.compression import user_subset
    from nimbleml.rec.data import SequenceData, leave_last_out

    data = SequenceData.load(parent[1])
    users = np.array([3, 10, 11, 40])
    full, part = leave_last_out(data, 16), leave_last_out(user_subset(data, users), 16)
    for key in ("valid_input", "valid_target", "test_input", "test_target"):
        np.testing.assert_array_equal(part[key], full[key][users])


def test_a_student_inherits_the_teachers_repeat_bonus() -> None:
    """The distillation loss scores hidden states only, so a student's repeat terms never train:
    they must start as the teacher's (the gate through the width-reducing basis)."""
    torch.manual_seed(0)
    teacher = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=16, n_blocks=2, repeat_scores=True, repeat_counts=True,
                                        repeat_decay=True))
    with torch.no_grad():
        teacher.repeat_recency.weight.normal_()
        teacher.repeat_count.weight.normal_()
        teacher.repeat_decay_weight.fill_(2.5)
        teacher.repeat_gate.bias.fill_(0.7)
    layout = student_config(teacher, 0.2)
    student = SeqRec(layout)
    basis = torch.linalg.svd(teacher.item_emb.weight.detach(), full_matrices=False)[2][: layout.dim].T
    with torch.no_grad():
        inherit_repeat_terms(teacher, student, basis)
    assert layout.repeat_scores and layout.dim < teacher.config.dim
    torch.testing.assert_close(student.repeat_recency.weight, teacher.repeat_recency.weight)
    torch.testing.assert_close(student.repeat_count.weight, teacher.repeat_count.weight)
    assert student.repeat_decay_weight.item() == 2.5 and student.repeat_gate.bias.item() == pytest.approx(0.7)
    torch.testing.assert_close(student.repeat_gate.weight, teacher.repeat_gate.weight @ basis)
