"""Latency tables and latency budgets (issue 29): a table measured on a synthetic runtime
whose cost is known predicts it; the real runtimes' profiles name every layer; the cache
is reused and refused; pruning to a budget is exact; bad budgets are one line each."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import math
import sys

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from netslim import latency
from netslim.cli import main
from netslim.engine.plan import plan_for_latency, plan_keeping, reference_network
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError
from netslim.latency import LatencyBudget, Profile, latency_table, layer_of, load_table, table_for
from netslim.slim import prune_model

STEP = 8
PENALTY = 1.5  # the synthetic runtime: a layer with a width off a multiple of STEP
MS_PER_MAC = 1e-6


def net(widths=(16, 24, 32), seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers, n_in = [], 3
    for w in widths:
        layers += [nn.Conv2d(n_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        n_in = w
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n_in, 10))
    return randomize_bn(model, seed).eval()


def layer_cost(layer, n_in: int, n_out: int) -> float:
    """The synthetic runtime's time of one layer: its MACs, PENALTY times slower where a
    width is off the step (as a runtime's blocked kernels are, whatever the network)."""
    off = n_in % STEP or n_out % STEP
    return MS_PER_MAC * layer.pixels * layer.kernel * n_in * n_out * (PENALTY if off else 1.0)


def synthetic(plan) -> float:
    total = 0.0
    for layer in plan.graph.layers.values():
        total += layer_cost(
            layer, int(plan.keep[layer.inputs].sum()), int(plan.keep[layer.outputs].sum())
        )
    return total


@pytest.fixture
def fake_runtime(monkeypatch):
    """latency_table's profiles from the synthetic runtime: each layer's time is its cost
    at the widths of the network profiled, nothing else takes time. Counts the calls."""
    calls = []

    def profile(runtime, model, x, names, device):
        calls.append(model)
        graph = trace_channels(model, (1, *x.shape[1:]))
        ms = {
            name: layer_cost(
                graph.layers[name], len(graph.layers[name].inputs), len(graph.layers[name].outputs)
            )
            for name in names
        }
        return Profile(sum(ms.values()), sum(ms.values()), ms)

    monkeypatch.setattr(latency, "_profile", profile)
    monkeypatch.setenv("NETSLIM_CACHE", "/nonexistent-netslim-cache")  # every test names its file
    return calls


def test_the_table_predicts_a_known_runtime_at_every_width_on_its_step(fake_runtime):
    model = net()
    graph = trace_channels(model, (1, 3, 16, 16))
    table = latency_table(model, graph, "onnxruntime", step=STEP)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):  # random plans at multiples of the step: time is linear in MACs there
        kept = [
            STEP * int(torch.randint(1, g.size // STEP + 1, (1,), generator=generator))
            for g in graph.prunable.values()
        ]
        plan = plan_keeping(graph, kept)
        assert table.predict(plan) == pytest.approx(synthetic(plan), rel=1e-6)


def test_the_table_charges_a_width_off_the_step_what_the_runtime_does(fake_runtime):
    model = net()
    graph = trace_channels(model, (1, 3, 16, 16))
    table = latency_table(model, graph, "onnxruntime", step=STEP)
    sizes = [g.size for g in graph.prunable.values()]
    on = plan_keeping(graph, [16, 16, 16][: len(sizes)])
    off = plan_keeping(graph, [16, 15, 16][: len(sizes)])  # 15 of the second group's 24
    # one channel fewer, yet slower: the table says so, as the runtime does
    assert table.predict(off) > table.predict(on)
    assert synthetic(off) > synthetic(on)


def test_the_table_is_monotone_where_the_runtime_is(fake_runtime):
    model = net((32, 32, 32))
    graph = trace_channels(model, (1, 3, 16, 16))
    table = latency_table(model, graph, "onnxruntime", step=STEP)
    times = [table.predict(plan_keeping(graph, [w] * 3)) for w in range(32, 0, -STEP)]
    assert times == sorted(times, reverse=True)
    assert len(set(times)) == len(times)


def test_a_latency_plan_meets_its_budget_and_is_pruned_exactly(fake_runtime):
    model = net()
    graph = trace_channels(model, (1, 3, 16, 16))
    table = latency_table(model, graph, "onnxruntime", step=STEP)
    budget = 0.5 * table.whole_ms
    plan = plan_for_latency(model, budget, table.predict, graph=graph, round_to=STEP)
    assert table.predict(plan) <= budget
    assert all(kept % STEP == 0 or kept == total for kept, total in plan.kept.values())
    x = torch.randn(4, 3, 16, 16)
    pruned = apply_plan(model, plan, compensate=False)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(x), reference_network(model, plan, False)(x), rtol=1e-4, atol=1e-5
        )


def test_the_cache_is_reused_and_refused_when_the_network_or_size_changes(fake_runtime, tmp_path):
    path = tmp_path / "table.json"
    model = net()
    graph = trace_channels(model, (1, 3, 16, 16))
    budget = LatencyBudget(share=0.5, table=path).check()
    _, said = table_for(model, graph, budget)
    measured = len(fake_runtime)
    assert measured == len(latency.SHARES) + 1 and "measured" in said and path.exists()
    again, said = table_for(model, graph, budget)
    assert len(fake_runtime) == measured and said == f"latency table read from {path}"
    assert json.loads(json.dumps(again.to_dict())) == json.loads(path.read_text())
    # another image size: the file is refused, measured again and replaced
    _, said = table_for(model, trace_channels(model, (1, 3, 24, 24)), budget)
    assert "measured for another network" in said or "another image size" in said
    assert len(fake_runtime) == 2 * measured
    # another network: refused by name
    other = net((16, 32, 32))
    key = latency.table_key(trace_channels(other, (1, 3, 24, 24)), "onnxruntime", 1, "cpu", STEP)
    with pytest.raises(NetslimError, match="was measured for another network"):
        load_table(path, key)


@pytest.mark.parametrize("choice", ["threshold", "latency"])
def test_prune_model_to_a_latency_budget_meets_the_predicted_budget(fake_runtime, tmp_path, choice):
    model = net()
    pruned, report = prune_model(
        model,
        target_latency=LatencyBudget(
            share=0.5, table=tmp_path / "t.json", verify=False, choice=choice
        ),
        input_size=(3, 16, 16),
    )
    assert report.latency["predicted_ms"] <= 0.5 * report.latency["predicted_unpruned_ms"] + 1e-9
    assert report.check_difference is not None and report.check_difference < 1e-4
    if choice == "latency":
        assert "the most importance per millisecond" in report.text()
        assert math.isnan(report.threshold)
    else:  # the paper's rule: every channel kept has |gamma| above the one threshold
        assert report.threshold > 0 and "threshold |gamma| >" in report.text()


def test_the_threshold_choice_is_the_lowest_threshold_within_the_budget(fake_runtime):
    from netslim.engine.plan import plan_by_threshold, plan_pruning

    model = net()
    graph = trace_channels(model, (1, 3, 16, 16))
    table = latency_table(model, graph, "onnxruntime", step=STEP)
    budget = 0.6 * table.whole_ms
    plan = plan_by_threshold(model, budget, table.predict, graph=graph, round_to=STEP)
    assert table.predict(plan) <= budget
    gammas = torch.cat(
        [m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    )
    lower = gammas[gammas < plan.threshold].max()  # the next lower threshold breaks the budget
    looser = plan_pruning(model, 0.0, graph=graph, threshold=float(lower), round_to=STEP)
    assert table.predict(looser) > budget


# --- the real runtimes -------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch"])
def test_every_layer_is_found_in_the_runtimes_profile(runtime):
    """The profile's node names lead back to every traced layer, a ReLU fused into its
    convolution included (onnxruntime names the fused node after the ReLU's output)."""
    from netslim.models import build_model

    model = build_model("resnet56", 10).eval()
    graph = trace_channels(model, (1, 3, 32, 32))
    table = latency_table(model, graph, runtime)
    assert set(table.layers) == {n for n, x in graph.layers.items() if x.inference}
    # OpenVINO ran in a process of its own: loaded here, it crashed later forks
    assert "openvino" not in sys.modules
    full = plan_keeping(graph, [g.size for g in graph.prunable.values()])
    assert table.predict(full) == pytest.approx(table.whole_ms, rel=0.05)
    assert table.predict(plan_keeping(graph, [8] * len(graph.prunable))) < table.whole_ms


def test_node_names_lead_to_their_layer():
    names = {"model.0.conv", "layers.0.0.conv1", "layers.1.0.shortcut.0"}
    assert layer_of("/model.0/conv/Conv_output_0_nchwc", names) == "model.0.conv"
    assert layer_of("/layers/layers.0/layers.0.0/conv1/Conv", names) == "layers.0.0.conv1"
    assert (
        layer_of("/layers/layers.1/layers.1.0/shortcut/shortcut.0/Conv", names)
        == "layers.1.0.shortcut.0"
    )
    assert layer_of("/model.2/Concat", names) is None


# --- bad input: one line each ------------------------------------------------------


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue().strip()


@pytest.mark.parametrize(
    "flags, says",
    [
        (
            ["--target-latency", "0"],
            "--target-latency must be a share of the unpruned network's latency in (0, 1)",
        ),
        (["--target-latency", "1.5"], "got 1.5"),
        (["--target-latency", "nan"], "got nan"),
        (["--target-ms", "-2"], "--target-ms must be a positive number of milliseconds"),
        (["--target-latency", "0.5", "--ratio", "0.5"], "not allowed with argument"),
        (["--target-latency", "0.5", "--batch", "0"], "--batch must be a whole number >= 1"),
    ],
)
def test_a_bad_budget_is_one_line(flags, says, tmp_path):
    code, err = run(
        "prune", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o.pth"), *flags
    )
    assert code != 0
    assert says in err.splitlines()[-1]
    assert "Traceback" not in err


def test_a_runtime_not_installed_is_one_line(monkeypatch, tmp_path):
    real = importlib.metadata.version

    def version(package):
        if package == "openvino":
            raise importlib.metadata.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(importlib.metadata, "version", version)
    code, err = run(
        "prune", str(tmp_path / "m.pth"), "--out", str(tmp_path / "o.pth"),
        "--target-latency", "0.5", "--runtime", "openvino",
    )  # fmt: skip
    assert code != 0
    assert err.splitlines()[-1].endswith(
        'runtime openvino is not installed: pip install "netslim[openvino]"'
    )


# --- YOLO: netslim yolo prune --target-latency and yolo speed-curve -----------------


@pytest.mark.slow
def test_a_yolo_pruned_to_a_latency_budget_and_its_speed_curve(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    from test_yolo import write_data
    from ultralytics.nn.tasks import DetectionModel

    from netslim.yolo.files import write_model

    monkeypatch.setenv("NETSLIM_CACHE", str(tmp_path / "cache"))
    data = write_data(tmp_path / "data")
    model = randomize_bn(DetectionModel("yolov8n.yaml", nc=2, verbose=False), 0)
    write_model(model, tmp_path / "y.pt", {"imgsz": 64})
    common = [
        "--data",
        str(data),
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--recalibrate",
        "1",
    ]
    code, err = run(
        "yolo",
        "prune",
        str(tmp_path / "y.pt"),
        "--target-latency",
        "0.7",
        *common,
        "--out",
        str(tmp_path / "p.pth"),
    )
    assert code == 0, err
    latency = json.loads((tmp_path / "p.json").read_text())["prune"]["latency"]
    assert latency["image_size"] == [64, 64] and latency["runtime"] == "onnxruntime"
    assert latency["measured_ms"] < latency["measured_unpruned_ms"]  # faster, never slower
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 1  # the table, kept
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(
            ["yolo", "speed-curve", str(tmp_path / "y.pt"), "--budgets", "0.8", *common, "--json"]
        )
    assert code == 0, err.getvalue()[-500:]
    (threshold, greedy) = json.loads(out.getvalue().splitlines()[-1])  # after Ultralytics' lines
    assert (threshold["choice"], greedy["choice"]) == ("threshold", "latency")
    for row in (threshold, greedy):  # timed beside the unpruned network: faster, or out of
        # reach at 64 px (a budget under what the floor leaves is a row saying so)
        assert row.get("error", "cannot reach").startswith("cannot reach")
        if "error" not in row:
            assert row["measured_ms"] < row["unpruned_ms"] and row["speedup"] > 1
            assert "mAP50-95" in row["metrics"] and "mAP50-95" in row["unpruned"]
