"""`rec train --nproc 2`: two local DDP processes against one process, and only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from nimbleml.rec import commands
from nimbleml.rec.data import SequenceData
from nimbleml.rec.train import launch_local
from tests.rec.test_train import make_data

EPOCHS = 12


def _train_recording_saves(data_dir: Path, out: Path, record: Path) -> None:
    """Runs in every spawned process: train, and note which ranks save a checkpoint."""
    real_save = commands.save_checkpoint

    def recording_save(*args: object, **kwargs: object) -> Path:
        with record.open("a") as f:
            f.write(f"{dist.get_rank()}\n")
        return real_save(*args, **kwargs)

    commands.save_checkpoint = recording_save
    commands.train_and_evaluate(SequenceData.load(data_dir), out, preset="small", epochs=EPOCHS, threads=2)


def test_two_processes_match_one_and_only_rank0_writes(tmp_path) -> None:
    data = make_data(n_users=240, n_items=130)  # >= 100 unseen items for the sampled protocol
    data.save(tmp_path / "data")
    launch_local(_train_recording_saves, 2, tmp_path / "data", tmp_path / "ddp", tmp_path / "saves.txt")
    assert (tmp_path / "saves.txt").read_text() == "0\n"
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single, _ = commands.train_and_evaluate(data, tmp_path / "one", preset="small", epochs=EPOCHS, threads=1)
    assert ddp["processes"] == 2 and single["processes"] == 1
    popular = single["baselines"]["popular"]["full"]["ndcg@10"]
    # both learn the walk (far above popularity) and land within noise of each other
    assert ddp["full"]["ndcg@10"] > popular + 0.1 and single["full"]["ndcg@10"] > popular + 0.1
    assert abs(ddp["full"]["ndcg@10"] - single["full"]["ndcg@10"]) < 0.1
    assert abs(ddp["full"]["hr@10"] - single["full"]["hr@10"]) < 0.1
