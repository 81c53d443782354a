import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from difflora.cli import main as cli_main
from difflora.tiny_models import make_tiny_model, write_clip_tokenizer


def test_tokenizer_known_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path))
    ids = tok("a photo of sks dog").input_ids
    assert len(ids) == 7  # start, five words, end
    assert tok.decode(tok("zebra!").input_ids, skip_special_tokens=True).replace(" ", "") == "zebra!"


def test_stock_pipeline_loads_and_samples(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    out = pipe("a photo of sks dog", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    assert (tiny_sd / "clip" / "model.safetensors").is_file()
    assert (tiny_sd / "dino" / "model.safetensors").is_file()


def test_sdxl_pipeline_loads(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    out = pipe("a red circle", num_inference_steps=2, output_type="np", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_model(tmp_path / "a", with_eval_models=False)
    b = make_tiny_model(tmp_path / "b", with_eval_models=False)
    c = make_tiny_model(tmp_path / "c", seed=1, with_eval_models=False)
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    wc = load_file(c / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_v_prediction_recorded(tiny_sd_v):
    cfg = json.loads((tiny_sd_v / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction"


def test_cli_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        cli_main(["make-tiny-model", str(tmp_path)])
    assert exc.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
