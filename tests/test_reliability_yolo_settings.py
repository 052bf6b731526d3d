"""Ultralytics settings, devices and data sets checked by netslim first (issue 27).

``netslim yolo train|finetune|lab`` pass Ultralytics' ``KEY=VALUE`` settings to its trainer;
each case a hostile user found (a key that repeats a flag, an unknown key, a value out of
range, a device the machine lacks, a data set Ultralytics would silently thin out) ends in
one line, exit status 2, before anything is written to --out. No training: the checks run
before the trainer starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from test_yolo import cli, write_data

from netslim.errors import NetslimError
from netslim.limits import cpu_count

GPU = torch.cuda.is_available()
MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@pytest.fixture
def data(tmp_path) -> Path:
    """A tiny, valid detection set (16 + 8 PNGs of 64 px, two classes): its data.yaml."""
    return write_data(tmp_path / "data")


def refused(capsys, out: Path, *argv) -> str:
    """Run the CLI; assert one line ``netslim: error: ...``, exit status 2, no traceback and
    nothing written to ``out`` (the command's --out); return the line."""
    code, _, err = cli(capsys, *argv, "--out", out)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("netslim: error: "), err
    assert not out.exists()
    return lines[0]


def train(capsys, tmp_path, data, *extra) -> str:
    """``netslim yolo train`` on ``data`` refused; its one line."""
    return refused(
        capsys,
        tmp_path / "run",
        "yolo",
        "train",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "--image-size",
        "64",
        *extra,
    )


def edit_label(data: Path, name: str, text: str) -> None:
    (data.parent / "labels" / "train" / name).write_text(text)


# --------------------------------------------------------------------------------------
# 1. Keys netslim owns: each names the flag to use instead
# --------------------------------------------------------------------------------------


def test_epochs_as_a_setting_names_the_epochs_flag(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "epochs=3")
    assert line.endswith("epochs=3 repeats --epochs: use --epochs 3")


def test_data_as_a_setting_names_the_data_flag(tmp_path, capsys, data):
    assert "data=other.yaml repeats --data: use --data other.yaml" in train(
        capsys, tmp_path, data, "data=other.yaml"
    )


def test_model_as_a_setting_names_the_model_flag(tmp_path, capsys, data):
    assert "model=yolov8s.yaml repeats --model: use --model yolov8s.yaml" in train(
        capsys, tmp_path, data, "model=yolov8s.yaml"
    )


def test_model_as_a_finetune_setting_names_the_checkpoint_argument(tmp_path, capsys, data):
    line = refused(
        capsys,
        tmp_path / "run",
        "yolo",
        "finetune",
        tmp_path / "p.pth",
        "--data",
        data,
        "model=yolov8s.yaml",
    )
    assert "the network to fine-tune is the CHECKPOINT argument" in line


def test_resume_as_a_setting_names_the_resume_flag(tmp_path, capsys, data):
    assert "resume=True repeats --resume: to continue the run in --out, add --resume" in train(
        capsys, tmp_path, data, "resume=True"
    )


def test_resume_as_a_lab_setting_says_the_lab_continues_when_run_again(tmp_path, capsys, data):
    line = refused(
        capsys,
        tmp_path / "lab",
        "yolo",
        "lab",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "resume=True",
    )
    assert "run the same command again" in line


def test_imgsz_as_a_setting_names_the_image_size_flag_and_its_bound(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "imgsz=16000")
    assert "imgsz=16000 repeats --image-size" in line and "from 8 to 4096 pixels" in line


def test_batch_as_a_setting_names_the_batch_size_flag(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "batch=0")
    assert "batch=0 repeats --batch-size" in line and "at least 1, got 0" in line


@pytest.mark.skipif(GPU, reason="this machine has a CUDA GPU")
def test_device_as_a_setting_names_the_device_flag_and_the_devices_here(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "device=cuda")
    assert "device=cuda repeats --device" in line and "its devices: cpu" in line


@pytest.mark.parametrize("key", ["save_dir", "project", "name"])
def test_a_setting_that_moves_the_run_folder_says_the_run_folder_is_out(
    tmp_path, capsys, data, key
):
    elsewhere = tmp_path / "elsewhere"
    assert f"{key}={elsewhere}: the run folder is --out" in train(
        capsys, tmp_path, data, f"{key}={elsewhere}"
    )
    assert not elsewhere.exists()


def test_exist_ok_as_a_setting_is_refused_netslim_places_the_run(tmp_path, capsys, data):
    assert "exist_ok=False: netslim writes the run into --out" in train(
        capsys, tmp_path, data, "exist_ok=False"
    )


def test_a_pretrained_file_is_refused_ultralytics_would_unpickle_it(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "pretrained=other.pt")
    assert "full unpickler" in line and "--model" in line


def test_a_cfg_file_is_refused_the_trainer_would_ignore_it(tmp_path, capsys, data):
    assert "reads no cfg file" in train(capsys, tmp_path, data, "cfg=mine.yaml")


def test_a_setting_given_twice_is_one_line(tmp_path, capsys, data):
    assert "lr0= is given twice" in train(capsys, tmp_path, data, "lr0=0.1", "lr0=0.2")


def test_a_setting_without_a_value_is_one_line(tmp_path, capsys, data):
    assert "lr0=: lr0 has no value" in train(capsys, tmp_path, data, "lr0=")


# --------------------------------------------------------------------------------------
# 2. Unknown keys
# --------------------------------------------------------------------------------------


def test_an_unknown_key_names_the_closest_known_keys(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "lr=0.1")
    assert "Ultralytics has no setting 'lr'" in line and "lr0" in line and "lrf" in line


def test_an_unknown_key_without_a_close_one_points_to_ultralytics_settings(tmp_path, capsys, data):
    assert "foo=1: Ultralytics has no setting 'foo'; see `yolo cfg`" in train(
        capsys, tmp_path, data, "foo=1"
    )


# --------------------------------------------------------------------------------------
# 3. Values by type and range, sizes within netslim's bounds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, says",
    [
        ("lr0=abc", "lr0 takes a number from 0 to 1"),
        ("lr0=-1", "lr0 takes a number from 0 to 1"),
        ("lr0=nan", "lr0 takes a number from 0 to 1"),
        ("momentum=2", "momentum takes a number from 0 to 1"),
        ("box=inf", "box takes a number >= 0"),
        ("workers=-3", "workers takes a whole number >= 0"),
        ("close_mosaic=1.5", "close_mosaic takes a whole number >= 0"),
        ("amp=maybe", "Valid 'amp' values are True, False"),  # Ultralytics' own rule
        ("scale=5", "Valid 'scale' values are between 0.0 and 1.0"),
        ("optimizer=Adamm", "optimizer takes one of SGD"),
        ("cache=yes", "cache takes one of True, False, ram, disk"),
        ("plots=yes", "plots takes True or False"),
        ("freeze=-1", "freeze takes a number of layers >= 0"),
    ],
)
def test_a_value_of_the_wrong_type_or_range_is_one_line(tmp_path, capsys, data, setting, says):
    assert says in train(capsys, tmp_path, data, setting)


def test_workers_beyond_the_cpus_are_refused(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, f"workers={cpu_count() + 1}")
    assert f"is more than the CPUs this process may use ({cpu_count()})" in line


def test_epochs_below_one_as_a_flag_are_refused(tmp_path, capsys, data):
    assert "--epochs must be a whole number of epochs, at least 1, got -1" in train(
        capsys, tmp_path, data, "--epochs", "-1"
    )


def test_a_batch_size_of_zero_as_a_flag_is_refused(tmp_path, capsys, data):
    assert "--batch-size must be a whole number of images, at least 1, got 0" in train(
        capsys, tmp_path, data, "--batch-size", "0"
    )


def test_a_batch_size_of_zero_is_refused_when_pruning_too(tmp_path, capsys, data):
    line = refused(
        capsys,
        tmp_path / "p.pth",
        "yolo",
        "prune",
        tmp_path / "y.pt",
        "--ratio",
        "0.5",
        "--batch-size",
        "0",
    )
    assert "--batch-size must be a whole number of images" in line


def test_a_batch_larger_than_memory_is_refused(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "--image-size", "4096", "--batch-size", "100000")
    assert "more than a quarter of this machine's" in line and "lower --batch-size" in line


def test_multi_scale_past_the_image_size_bound_is_refused(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "--image-size", "4096", "multi_scale=0.5")
    assert "multi_scale=0.5 trains at up to 6144 pixels" in line and "more than 4096" in line


def test_lab_epochs_and_finetune_epochs_are_checked_before_the_lab_starts(tmp_path, capsys, data):
    line = refused(
        capsys,
        tmp_path / "lab",
        "yolo",
        "lab",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "--finetune-epochs",
        "0",
    )
    assert "--finetune-epochs must be a whole number of epochs, at least 1, got 0" in line


def test_a_bad_lab_setting_is_refused_before_the_lab_writes_its_folder(tmp_path, capsys, data):
    line = refused(
        capsys,
        tmp_path / "lab",
        "yolo",
        "lab",
        "--model",
        "yolov8n.yaml",
        "--data",
        data,
        "mosaic=2",
    )
    assert "mosaic=2: mosaic takes a number from 0 to 1" in line


def test_the_settings_the_docs_and_tests_use_pass_valued_as_ultralytics_values_them():
    from test_yolo import QUICK

    from netslim.yolo.settings import check_settings, parse_settings

    settings = parse_settings([*QUICK, "optimizer=SGD", "lr0=0.01"])
    assert settings == {
        "workers": 0,
        "nbs": 8,
        "amp": False,
        "warmup_epochs": 0,
        "mosaic": 0,
        "optimizer": "SGD",
        "lr0": 0.01,
    }
    given = {**settings, "batch": 8, "device": "cpu", "fraction": 1}
    check_settings(given, epochs=1, imgsz=64)
    assert given["fraction"] == 1 and type(given["fraction"]) is int  # Ultralytics' check_cfg
    # would make it 1.0 in place: the settings are checked, never changed


# --------------------------------------------------------------------------------------
# 4. Devices
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(GPU, reason="this machine has a CUDA GPU")
def test_a_cuda_device_flag_without_a_gpu_names_the_devices_here(tmp_path, capsys, data):
    assert "--device cuda: this machine has no CUDA GPU; its devices: cpu" in train(
        capsys, tmp_path, data, "--device", "cuda"
    )


@pytest.mark.skipif(GPU, reason="this machine has a CUDA GPU")
def test_a_cuda_device_is_refused_when_validating_too(tmp_path, capsys, data):
    code, _, err = cli(capsys, "yolo", "val", tmp_path / "y.pt", "--data", data, "--device", "0")
    assert code == 2 and err.startswith("netslim: error: --device 0: this machine has no CUDA GPU")


@pytest.mark.skipif(MPS, reason="this machine has Apple MPS")
def test_mps_off_a_mac_names_the_devices_here(tmp_path, capsys, data):
    line = train(capsys, tmp_path, data, "--device", "mps")
    assert (
        "--device mps: this machine has no Apple MPS device" in line and "its devices: cpu" in line
    )


def test_a_word_that_is_no_device_names_the_device_forms(tmp_path, capsys, data):
    assert "--device gpu: not a device; use auto, cpu, cuda, cuda:N" in train(
        capsys, tmp_path, data, "--device", "gpu"
    )


def test_a_gpu_index_beyond_the_gpus_names_those_there_are(monkeypatch):
    from netslim.yolo.settings import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        NetslimError,
        match="--device cuda:7: this machine has no CUDA GPU 7; its devices: cpu, cuda:0, cuda:1",
    ):
        check_device("cuda:7")


def test_devices_that_exist_reach_ultralytics_by_its_names(monkeypatch):
    from netslim.yolo.settings import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked = ["auto", None, "cpu", "cuda", "cuda:1", "1", "0,1", [0, 1], "-1"]
    assert [check_device(d) for d in asked] == [
        None,
        None,
        "cpu",
        "0",
        "1",
        "1",
        "0,1",
        "0,1",
        "-1",
    ]


# --------------------------------------------------------------------------------------
# 5. Data sets: labels and images Ultralytics would skip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, says",
    [
        ("5 0.5 0.5 0.2 0.2", "class 5 is not one of the 2 classes the data.yaml names (0 to 1)"),
        ("-1 0.5 0.5 0.2 0.2", "class -1 is not one of the 2 classes"),
        ("0.5 0.5 0.5 0.2 0.2", "class 0.5 is not one of the 2 classes"),
        ("0 nan 0.5 0.2 0.2", "a NaN or infinite value"),
        ("0 1.5 0.5 0.2 0.2", "a coordinate outside the image"),
        ("0 0.5 0.5 0 0.2", "a box of zero or negative size"),
        ("0 0.5 0.5 0.2 -0.1", "a coordinate outside the image"),
        ("0 0.5 0.5 x 0.2", "'x' is not a number"),
        ("0 0.5 0.5 0.2", "4 values, but a line is class x y w h or class x1 y1"),
        ("0 0.1 0.1 1.3 0.1 0.2 0.2", "a coordinate outside the image"),
        ("0 0.1 0.1 0.2 0.1 0.3 0.1", "a polygon of zero or negative size"),
        (
            "0 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.2 0.1 0.2 0.2",
            "a polygon in a file of boxes; use one kind per file",
        ),
    ],
    ids=[
        "class beyond names",
        "negative class",
        "fractional class",
        "NaN",
        "outside",
        "zero size",
        "negative size",
        "text",
        "too few values",
        "polygon outside",
        "flat polygon",
        "mixed",
    ],
)
def test_a_bad_label_line_names_the_file_the_line_and_the_fault(
    tmp_path, capsys, data, label, says
):
    edit_label(data, "3.txt", label + "\n")
    line = train(capsys, tmp_path, data)
    assert "1 of its 24 images is bad (the image or its label file); the first: " in line
    assert f"{data.parent / 'labels' / 'train' / '3.txt'} line " in line and says in line
    assert not list(data.parent.rglob("*.cache"))  # Ultralytics never ran: no label cache


def test_the_count_of_bad_images_and_the_first_of_them_are_named(tmp_path, capsys, data):
    edit_label(data, "1.txt", "7 0.5 0.5 0.2 0.2\n")
    edit_label(data, "4.txt", "0 0.5 0.5 0.2 0.2 0.9\n")
    (data.parent / "images" / "val" / "2.png").write_text("not an image")
    line = train(capsys, tmp_path, data)
    assert "3 of its 24 images are bad" in line and "labels/train/1.txt line 1: class 7" in line


def test_a_file_that_is_no_image_is_named(tmp_path, capsys, data):
    (data.parent / "images" / "train" / "5.png").write_text("hello")
    line = train(capsys, tmp_path, data)
    assert "images/train/5.png is not an image (PIL recognises no image format in it)" in line


def test_a_png_with_a_damaged_chunk_is_named(tmp_path, capsys, data):
    path = data.parent / "images" / "val" / "1.png"
    damaged = bytearray(path.read_bytes())
    damaged[60] ^= 0xFF  # inside the image data: its CRC no longer matches
    path.write_bytes(bytes(damaged))
    assert "images/val/1.png is a damaged image (broken PNG file" in train(capsys, tmp_path, data)


def test_a_truncated_jpeg_is_named_and_one_with_bytes_after_its_end_is_not(tmp_path, capsys, data):
    folder = data.parent / "images" / "train"
    for png in folder.glob("*.png"):
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    from netslim.yolo.data import check_data

    whole = (folder / "2.jpg").read_bytes()
    (folder / "2.jpg").write_bytes(whole + b"trailing bytes")  # still decodes: accepted
    check_data(data)
    (folder / "2.jpg").write_bytes(whole[: len(whole) // 2])
    assert "images/train/2.jpg is a damaged image" in train(capsys, tmp_path, data)


def test_an_image_under_ten_pixels_is_named(tmp_path, capsys, data):
    Image.new("RGB", (5, 5)).save(data.parent / "images" / "val" / "0.png")
    assert "images/val/0.png is 5x5 pixels; Ultralytics skips images under 10" in train(
        capsys, tmp_path, data
    )


def test_a_gif_named_png_is_named(tmp_path, capsys, data):
    Image.new("RGB", (32, 32)).save(data.parent / "images" / "val" / "0.png", format="GIF")
    assert "images/val/0.png is a GIF file, which Ultralytics does not read" in train(
        capsys, tmp_path, data
    )


def test_a_split_without_any_label_file_is_refused(tmp_path, capsys, data):
    for label in (data.parent / "labels" / "val").glob("*.txt"):
        label.unlink()
    line = train(capsys, tmp_path, data)
    assert "none of the 8 images of its val split has a label file" in line


def test_images_without_a_label_file_are_background_and_pass(data):
    from netslim.yolo.data import check_data

    (data.parent / "labels" / "train" / "0.txt").unlink()
    (data.parent / "labels" / "train" / "1.txt").write_text("")
    check_data(data)  # no error: Ultralytics trains on them as background


def test_a_segment_model_given_box_labels_is_refused(tmp_path, capsys, data):
    line = refused(
        capsys,
        tmp_path / "run",
        "yolo",
        "train",
        "--model",
        "yolov8n-seg.yaml",
        "--data",
        data,
        "--image-size",
        "64",
    )
    assert "5 values, but a segment model's line is class x1 y1 x2 y2" in line


def test_polygon_labels_pass_for_a_segment_model_and_a_detector(tmp_path):
    from netslim.yolo.data import check_data

    data = write_data(tmp_path / "seg", segments=True)
    check_data(data, "segment")
    check_data(data, "detect")


def test_a_data_yaml_without_class_names_is_one_line(tmp_path, capsys, data):
    data.write_text(f"path: {data.parent}\ntrain: images/train\nval: images/val\n")
    assert "names no classes; add names:" in train(capsys, tmp_path, data)


def test_a_missing_image_listed_in_a_text_file_is_named(tmp_path, capsys, data):
    (data.parent / "train.txt").write_text("./images/train/0.png\n./images/train/99.png\n")
    data.write_text(f"path: {data.parent}\ntrain: train.txt\nval: images/val\nnames: [a, b]\n")
    assert "images/train/99.png does not exist" in train(capsys, tmp_path, data)


# --------------------------------------------------------------------------------------
# The Python API is checked the same way
# --------------------------------------------------------------------------------------


def test_the_python_api_checks_settings_before_writing(tmp_path, data):
    from netslim.yolo.train import train as yolo_train

    out = tmp_path / "run"
    with pytest.raises(NetslimError, match="workers 1000 is more than the CPUs"):
        yolo_train("yolov8n.yaml", data, out, workers=1000, imgsz=64)
    with pytest.raises(NetslimError, match="save_dir= in the settings: the run folder is --out"):
        yolo_train("yolov8n.yaml", data, out, save_dir=str(tmp_path / "x"), imgsz=64)
    assert not out.exists()


def test_the_python_api_checks_the_data_before_writing(tmp_path, data):
    from netslim.yolo.train import train as yolo_train

    edit_label(data, "2.txt", "9 0.5 0.5 0.2 0.2\n")
    out = tmp_path / "run"
    with pytest.raises(NetslimError, match="class 9 is not one of the 2 classes"):
        yolo_train("yolov8n.yaml", data, out, imgsz=64)
    assert not out.exists()
