"""Checkpoints: resume is bit-identical (cached latents too), nothing in a checkpoint is unpickled,
and a refused, truncated or malformed checkpoint is one line with exit 2, never a traceback."""

from __future__ import annotations

import builtins
import json
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from difflora.cli import main as cli_main
from difflora.config import parse_config
from difflora.optim import build_optimizer
from difflora.train import checkpoint as ckpt
from difflora.train.dreambooth import DreamBoothConfig, train

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "concepts"


def run(argv: list[str]) -> dict:
    return train(parse_config(DreamBoothConfig, argv))


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- resume --------------------------------------------------------------------------------------


def test_cached_latents_resume_is_bit_identical(db_args, tmp_path, monkeypatch, interrupted_after):
    """--cache_latents draws each image's VAE sample from (seed, image): an interrupted run whose
    cache starts empty on resume ends with the uninterrupted run's weights, bit for bit."""
    flags = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--cache_latents", "--random_flip",
             "--learning_rate", "1e-2", "--num_validation_images", "0"]
    run(db_args("whole", *flags))
    with monkeypatch.context() as m:
        interrupted_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(db_args("cut", *flags))
    assert not (tmp_path / "cut" / "pytorch_lora_weights.safetensors").exists()
    summary = run(db_args("cut", *flags, "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 5
    assert _same(tmp_path / "whole", tmp_path / "cut")


# ---- the pickle-free state format ----------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


def _optimizer(name: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = get_peft_model(_Tiny(), LoraConfig(r=2, target_modules=["q"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    options = {"lr": 1e-2, "model": model} if name == "peft_riemannian" else {"lr": 1e-2}
    if name in ("sgd", "scaled_sgd"):
        options["momentum"] = 0.9
    return model, build_optimizer(name, [{"params": named}], **options)


def _train(model: nn.Module, optimizer, scheduler, steps: int, first: int) -> None:
    for i in range(first, first + steps):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(i))
        model(x).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", ["adamw", "scaled_adamw", "sgd", "scaled_sgd", "loraplus", "peft_riemannian"])
def test_state_round_trip_resumes_bit_identically(name, tmp_path):
    """Every optimizer's and the scheduler's state survive safetensors + JSON exactly (types too):
    stepping on from the loaded state equals stepping on from the live one."""
    model, opt = _optimizer(name)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=1, num_training_steps=10)
    _train(model, opt, sched, 3, 0)
    ckpt.save_state(opt.state_dict(), tmp_path, "optimizer")
    ckpt.save_state(sched.state_dict(), tmp_path, "scheduler")
    restored = ckpt.load_state(tmp_path, "optimizer")
    assert restored["param_groups"] == opt.state_dict()["param_groups"]  # tuples stay tuples, ints stay ints
    assert ckpt.load_state(tmp_path, "scheduler") == sched.state_dict()

    other, opt2 = _optimizer(name, seed=1)
    with torch.no_grad():
        for p, q in zip(other.parameters(), model.parameters()):
            p.copy_(q)
    sched2 = get_scheduler("cosine", optimizer=opt2, num_warmup_steps=1, num_training_steps=10)
    opt2.load_state_dict(restored)
    sched2.load_state_dict(ckpt.load_state(tmp_path, "scheduler"))
    _train(model, opt, sched, 3, 3)
    _train(other, opt2, sched2, 3, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


@pytest.mark.parametrize("doc", [
    {"__reduce__": ["os.system", "touch x"]},  # not a tag this format has
    {"tensor": "t9"},  # a tensor the safetensors file lacks
    {"dict": [[["a list"], 1]]},  # an unhashable key
    {"dict": [["a", 1, 2]]},
    {"tuple": "abc"},
])
def test_unknown_or_inconsistent_entries_are_refused(doc):
    with pytest.raises(ValueError):
        ckpt.unflatten_state(doc, {})


def test_only_plain_values_and_tensors_are_written(tmp_path):
    with pytest.raises(TypeError, match="only tensors and plain values"):
        ckpt.save_state({"f": print}, tmp_path, "x")


def test_non_finite_weights_are_never_saved(tmp_path):
    _, opt = _optimizer("adamw")
    sched = get_scheduler("constant", optimizer=opt)
    with pytest.raises(Exception, match="NaN or infinite"):
        ckpt.save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, math.inf])}, opt, sched, {})
    assert ckpt.nonfinite({"a": torch.ones(2), "b": torch.tensor([0.0, math.nan])}) == "b"
    assert ckpt.nonfinite({"a": torch.full((2,), 3e38)}) is None  # huge but finite is finite
    assert not list(tmp_path.iterdir())


# ---- crafted, truncated and malformed checkpoints: one line, exit 2, no code run -------------------


class _Payload:
    """A pickle that creates ``marker`` when unpickled: what a crafted optimizer.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def trained_run(tiny_sd, tmp_path_factory) -> tuple[Path, Callable[[Path], list[str]]]:
    """A 4-step run with checkpoint-2, and the flags that resume a copy of it."""
    root = tmp_path_factory.mktemp("ckpt")
    concept = root / "concept"
    shutil.copytree(ASSETS / "checkered_star", concept)

    def flags(out: Path) -> list[str]:
        return ["--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(concept),
                "--instance_prompt", "a photo of sks star", "--resolution", "32", "--train_batch_size", "2",
                "--max_train_steps", "4", "--checkpointing_steps", "2", "--num_validation_images", "0",
                "--output_dir", str(out)]

    run(flags(root / "run"))
    return root / "run", flags


def _resume_copy(trained_run, tmp_path) -> tuple[Path, list[str]]:
    src, flags = trained_run
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(src / "checkpoint-2", out / "checkpoint-2")
    return out / "checkpoint-2", ["dreambooth", *flags(out), "--resume_from_checkpoint", "latest"]


def _refused(argv: list[str], capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("difflora dreambooth: error:") and expect in err[-1], err[-1]
    return err[-1]


def _edit_state(stem: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = ckpt.load_state(folder, stem)
        change(state)
        ckpt.save_state(state, folder, stem)

    return edit


def _edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        weights = load_file(folder / "weights.safetensors")
        change(weights)
        save_file(weights, folder / "weights.safetensors")

    return edit


def _first(d: dict):
    return next(iter(d))


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


CRAFTED: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad optimizer JSON": (lambda d: (d / "optimizer.json").write_text("{oops"), "optimizer.json is not valid JSON"),
    "deeply nested JSON": (lambda d: (d / "optimizer.json").write_text("[" * 100_000 + "]" * 100_000),
                           "optimizer.json is not valid JSON"),
    "state.json not UTF-8": (lambda d: (d / "state.json").write_bytes(b"\xff\xfe{"), "state.json is not valid JSON"),
    "state.json not an object": (lambda d: (d / "state.json").write_text("[1, 2]"), "state.json is not a JSON object"),
    "missing scheduler tensors": (lambda d: (d / "scheduler.safetensors").unlink(), "scheduler.safetensors is missing"),
    "missing optimizer JSON": (lambda d: (d / "optimizer.json").unlink(), "optimizer.json is missing"),
    "truncated weights": (_truncate("weights.safetensors"), "weights.safetensors is truncated"),
    "truncated optimizer tensors": (_truncate("optimizer.safetensors"), "optimizer.safetensors is truncated"),
    "pickle as weights": (lambda d: (d / "weights.safetensors").write_bytes(pickle.dumps(_Payload(d / "pwned"))),
                          "weights.safetensors is truncated or not a safetensors file"),
    "unknown tag": (lambda d: (d / "optimizer.json").write_text(
        '{"format": "difflora-state/1", "value": {"pickle": "gASV"}}'), "unexpected entry"),
    "wrong format": (lambda d: (d / "scheduler.json").write_text('{"value": 1}'), "not a difflora state file"),
    "state tensor of wrong shape": (_edit_state("optimizer", lambda s: s["state"][_first(s["state"])].update(
        exp_avg=torch.zeros(3))), "optimizer state 'exp_avg' of parameter"),
    "state for an unknown parameter": (_edit_state("optimizer", lambda s: s["state"].update({999: {}})),
                                       "unknown parameter 999"),
    "learning rate not a number": (_edit_state("optimizer", lambda s: s["param_groups"][0].update(lr="abc")),
                                   "optimizer group 0.lr is a str"),
    "scheduler attribute shadowed": (_edit_state("scheduler", lambda s: s.update(step=5)), "not scheduler state"),
    "weight of wrong shape": (_edit_weights(lambda w: w.update({_first(w): torch.zeros(7)})),
                              "is a tensor of shape (7,)"),
    "NaN weight": (_edit_weights(lambda w: w[_first(w)].fill_(math.nan)), "is NaN or infinite"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_malformed_checkpoint_is_one_line(case, trained_run, tmp_path, capsys):
    folder, argv = _resume_copy(trained_run, tmp_path)
    edit, expect = CRAFTED[case]
    edit(folder)
    last = _refused(argv, capsys, expect)
    assert "cannot resume from checkpoint" in last and "checkpoint-2" in last
    assert not (folder / "pwned").exists()
    assert not (folder.parent / "pytorch_lora_weights.safetensors").exists()


def test_pickled_checkpoint_is_refused_and_never_unpickled(trained_run, tmp_path, capsys):
    """A checkpoint whose optimizer.pt would run code when unpickled: refused in one line, code not run."""
    folder, argv = _resume_copy(trained_run, tmp_path)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is real: unpickling it creates a file
    assert probe.exists()
    marker = tmp_path / "pwned"
    for stem in ("optimizer", "scheduler"):
        (folder / f"{stem}.json").unlink()
        (folder / f"{stem}.safetensors").unlink()
        (folder / f"{stem}.pt").write_bytes(pickle.dumps(_Payload(marker)))
    last = _refused(argv, capsys, "old pickle format (optimizer.pt)")
    assert "can run code" in last
    assert not marker.exists()


def test_stray_pickle_beside_a_good_checkpoint_is_ignored(trained_run, tmp_path, capsys):
    """The resume reads only safetensors and JSON: a planted optimizer.pt is never opened."""
    folder, argv = _resume_copy(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    (folder / "optimizer.pt").write_bytes(pickle.dumps(_Payload(marker)))
    cli_main(argv)
    assert not marker.exists()
    assert _same(trained_run[0], folder.parent)  # and the resume is still bit-identical


@pytest.mark.parametrize("extra, expect", [
    (["--shuffle_caption", "true"], "shuffle_caption=False, this run has True"),
    (["--repeats", "3"], "repeats=1, this run has 3"),
])
def test_resume_with_other_draw_options_is_refused(extra, expect, trained_run, tmp_path, capsys):
    """Options that change which example is drawn at a step: a checkpoint written without them (their
    defaults) is not continued as if it were the same run."""
    folder, argv = _resume_copy(trained_run, tmp_path)
    _refused([*argv, *extra], capsys, expect)


def test_draw_options_are_recorded_and_checked_both_ways(trained_run, tmp_path, capsys):
    """A checkpoint that records a non-default draw option refuses a run at the default."""
    folder, argv = _resume_copy(trained_run, tmp_path)
    state = json.loads((folder / "state.json").read_text())
    state["caption_dropout_rate"] = 0.5
    (folder / "state.json").write_text(json.dumps(state))
    _refused(argv, capsys, "caption_dropout_rate=0.5, this run has 0.0")
