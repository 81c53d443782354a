"""Scores equal a hand computation with the same tiny models; CLI outputs; bad input -> one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.cli import main as cli
from difflora.evaluation import mean_pairwise_cosine, score_images


def noise_images(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and the error line(s) (loaders' progress bars also go to stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, "\n".join(line for line in err.splitlines() if ": error: " in line)


@pytest.fixture(scope="module")
def positive_clip(tiny_sd, tmp_path_factory):
    """The tiny CLIP with final-layer-norm biases that give text and image embeddings a shared
    direction, so cosines are positive (a random CLIP's are all below 0, where CLIP-T clamps to 0)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_sd / "clip")
    common = torch.randn(model.config.projection_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for norm, proj in ((model.text_model.final_layer_norm, model.text_projection),
                           (model.vision_model.post_layernorm, model.visual_projection)):
            norm.weight.mul_(0.5)
            norm.bias.copy_(torch.linalg.pinv(proj.weight) @ common)
    out = tmp_path_factory.mktemp("clip-positive")
    model.save_pretrained(out)
    CLIPProcessor.from_pretrained(tiny_sd / "clip").save_pretrained(out)
    return out


@torch.no_grad()
def hand_clip(path, images=None, texts=None) -> torch.Tensor:
    """Unit CLIP embeddings computed from the sub-modules, not through difflora."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    if images is not None:
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    else:
        tok = proc(text=texts, return_tensors="pt", padding=True)
        emb = model.text_projection(model.text_model(**tok).pooler_output)
    return emb / emb.norm(dim=-1, keepdim=True)


def test_clip_t_equals_hand_computation(positive_clip):
    images = noise_images(3, seed=1)
    prompts = ["a red star", "a photo of a dog", "a sks star on a black background"]
    cos = (hand_clip(positive_clip, images=images) * hand_clip(positive_clip, texts=prompts)).sum(-1)
    expected = float(cos.clamp_min(0).mean())
    assert expected > 0.05 and len(set(cos.round(decimals=4).tolist())) == 3  # a non-trivial case
    scores = score_images(images, prompts, None, str(positive_clip))
    assert set(scores) == {"clip_t"}
    assert scores["clip_t"] == pytest.approx(expected, abs=1e-4)


def test_one_prompt_for_all_images(positive_clip):
    images = noise_images(2, seed=2)
    one = score_images(images, "a star", None, str(positive_clip))["clip_t"]
    listed = score_images(images, ["a star", "a star"], None, str(positive_clip))["clip_t"]
    assert one == pytest.approx(listed, abs=1e-6)


def test_mean_pairwise_cosine_is_over_all_pairs():
    a = torch.eye(2)
    assert mean_pairwise_cosine(a, a) == pytest.approx(0.5)  # diagonal only would give 1.0
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert mean_pairwise_cosine(a[:1], b) == pytest.approx((1.0 + 0.6 + 0.0) / 3)


def test_clip_i_equals_hand_mean_over_all_pairs(tiny_sd):
    clip = tiny_sd / "clip"
    gen, ref = noise_images(2, seed=3), noise_images(3, seed=4)
    g, r = hand_clip(clip, images=gen), hand_clip(clip, images=ref)
    all_pairs = float((g @ r.T).mean())
    diagonal = float((g * r[:2]).sum(-1).mean())
    assert abs(all_pairs - diagonal) > 1e-4  # the case tells the two protocols apart
    scores = score_images(gen, "a star", ref, str(clip))
    assert scores["clip_i"] == pytest.approx(all_pairs, abs=1e-5)
    assert "dino" not in scores


@torch.no_grad()
def test_dino_is_cls_token_mean_over_all_pairs(tiny_sd):
    from transformers import ViTImageProcessor, ViTModel

    gen, ref = noise_images(2, seed=5), noise_images(2, seed=6)
    model = ViTModel.from_pretrained(tiny_sd / "dino", add_pooling_layer=False).eval()
    proc = ViTImageProcessor.from_pretrained(tiny_sd / "dino")

    def emb(images):
        cls = model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
        return cls / cls.norm(dim=-1, keepdim=True)

    expected = float((emb(gen) @ emb(ref).T).mean())
    scores = score_images(gen, "a star", ref, str(tiny_sd / "clip"), dino_model=str(tiny_sd / "dino"))
    assert scores["dino"] == pytest.approx(expected, abs=1e-5)
    assert set(scores) == {"clip_t", "clip_i", "dino"}


def write_sample_folder(folder, images, prompts):
    """What difflora sample writes: images, a grid (must be ignored) and a manifest."""
    folder.mkdir(parents=True)
    entries = []
    for k, (im, p) in enumerate(zip(images, prompts)):
        im.save(folder / f"p{k:02d}-s0.png")
        entries.append({"file": f"p{k:02d}-s0.png", "prompt": p, "seed": 0})
    Image.new("RGB", (99, 40), "white").save(folder / "grid.png")
    (folder / "manifest.json").write_text(json.dumps({"settings": {}, "images": entries}))


def test_eval_cli_reads_sample_manifest_and_writes_json_and_table(tiny_sd, tmp_path, capsys):
    images, prompts = noise_images(2, seed=7), ["a star", "a dog"]
    write_sample_folder(tmp_path / "samples", images, prompts)
    (tmp_path / "refs").mkdir()
    for k, im in enumerate(noise_images(2, seed=8)):
        im.save(tmp_path / "refs" / f"{k}.png")
    cli(["eval", "--images", str(tmp_path / "samples"), "--reference", str(tmp_path / "refs"),
         "--clip-model", str(tiny_sd / "clip"), "--dino-model", str(tiny_sd / "dino"),
         "--out", str(tmp_path / "m" / "metrics.json")])
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    expected = score_images([Image.open(tmp_path / "samples" / f"p{k:02d}-s0.png").convert("RGB") for k in range(2)],
                            prompts, [Image.open(tmp_path / "refs" / f"{k}.png").convert("RGB") for k in range(2)],
                            str(tiny_sd / "clip"), str(tiny_sd / "dino"))
    assert metrics == pytest.approx(expected)
    table = (tmp_path / "m" / "metrics.md").read_text()
    assert "DreamBooth (Stable Diffusion) (paper) | 0.668 | 0.803 | 0.305" in table


def test_bad_input_one_line_exit_2(tiny_sd, tmp_path, capsys):
    clip = str(tiny_sd / "clip")
    code, err = run_cli(["eval", "--images", str(tmp_path / "missing"), "--prompt", "x", "--clip-model", clip], capsys)
    assert code == 2 and "does not exist" in err and "--images" in err and len(err.splitlines()) == 1

    (tmp_path / "empty").mkdir()
    code, err = run_cli(["eval", "--images", str(tmp_path / "empty"), "--prompt", "x", "--clip-model", clip], capsys)
    assert code == 2 and "is empty" in err and len(err.splitlines()) == 1

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    code, err = run_cli(["eval", "--images", str(tmp_path / "broken"), "--prompt", "x", "--clip-model", clip], capsys)
    assert code == 2 and "no readable image" in err and len(err.splitlines()) == 1

    (tmp_path / "imgs").mkdir()
    for k, im in enumerate(noise_images(3, seed=9)):
        im.save(tmp_path / "imgs" / f"{k}.png")
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    code, err = run_cli(["eval", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "prompts.txt"),
                         "--clip-model", clip, "--out", str(tmp_path / "m.json")], capsys)
    assert code == 2 and "3 images but 2 prompts" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.json").exists()

    write_sample_folder(tmp_path / "s", noise_images(1, seed=10), ["a star"])
    (tmp_path / "s" / "p00-s0.png").unlink()
    code, err = run_cli(["eval", "--images", str(tmp_path / "s"), "--clip-model", clip], capsys)
    assert code == 2 and "p00-s0.png" in err and len(err.splitlines()) == 1

    code, err = run_cli(["eval", "--images", str(tmp_path / "imgs"), "--prompt", "x",
                         "--clip-model", str(tmp_path / "no-clip")], capsys)
    assert code == 2 and "cannot load CLIP model" in err and len(err.splitlines()) == 1
