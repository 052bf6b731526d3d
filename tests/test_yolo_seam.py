"""netslim.yolo.seam, the one module that touches Ultralytics' internals: its task map,
metric keys, results.csv columns and checkpoint keys (no training here: test_yolo.py and
test_yolo_resume_pruned.py train through it)."""

from __future__ import annotations

import pickle

import pytest

from netslim.errors import NetslimError
from netslim.yolo import seam


def test_the_trainers_come_from_ultralytics_own_task_map():
    from ultralytics.models import yolo

    for task in ("detect", "segment", "classify", "pose", "obb"):
        trainer = seam.trainer_for(task)
        assert issubclass(trainer, seam.NetslimTrainer)
        assert issubclass(trainer, seam.task_map()[task]["trainer"])
        assert seam.trainer_for(task) is trainer  # one class per task
        # importable by name, as Ultralytics' DDP processes and pickle find it
        assert getattr(seam, trainer.__name__) is trainer
        assert pickle.loads(pickle.dumps(trainer)) is trainer
    assert seam.trainer_for("detect").__name__ == "SparsityDetectionTrainer"
    assert seam.validator_for("segment") is yolo.segment.SegmentationValidator
    with pytest.raises(NetslimError, match="no Ultralytics trainer for the task 'nope'"):
        seam.trainer_for("nope")


def test_metric_keys_results_columns_and_finished_checkpoints(tmp_path):
    assert seam.metric_key("mAP50-95") == "metrics/mAP50-95(B)"
    assert seam.metric_key("mask mAP50-95") == "metrics/mAP50-95(M)"
    results = {"metrics/mAP50(B)": 0.5, "metrics/mAP50-95(B)": 0.25, "fitness": 0.3}
    assert seam.named_metrics(results) == {"mAP50": 0.5, "mAP50-95": 0.25}
    assert seam.fitness(results) == 0.3
    assert seam.fitness({"metrics/mAP50-95(B)": 0.25}) == 0.25
    (tmp_path / "results.csv").write_text("epoch,time,metrics/mAP50(B)\n1,2.5,0.1\n2,5.0,0.2\n")
    assert seam.results_column(tmp_path, seam.TIME_COLUMN) == [2.5, 5.0]
    assert seam.results_column(tmp_path, "nope") is None
    assert seam.results_column(tmp_path / "none", "time") is None
    assert seam.finished_checkpoint({"epoch": -1}) and not seam.finished_checkpoint({"epoch": 0})
    assert seam.checkpoint_network({"ema": "e", "model": "m"}) == "e"
    assert seam.checkpoint_network({"ema": None, "model": "m"}) == "m"
    assert seam.checkpoint_network({"epoch": 0}) is None


def test_the_settings_dump_stays_off_the_screen(tmp_path, caplog):
    """Ultralytics prints all its settings whenever a trainer is built; netslim's print none
    (they are in the run's args.yaml)."""
    import logging

    from test_yolo import write_data

    data = write_data(tmp_path / "data", n_train=2, n_val=2)
    with caplog.at_level(logging.INFO, logger="ultralytics"):
        trainer = seam.trainer_for("detect")(
            overrides={
                "data": str(data),
                "model": "yolov8n.yaml",
                "project": str(tmp_path),
                "name": "run",
                "device": "cpu",
                "plots": False,
            }
        )
    assert "engine/trainer:" not in caplog.text
    assert (trainer.save_dir / "args.yaml").is_file()
