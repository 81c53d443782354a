from huggingface_hub import ModelCard

from difflora.train.validation import write_model_card


def _card(tmp_path, base: str, validation_prompt: str | None):
    config = {"pretrained_model_name_or_path": base, "instance_prompt": "a photo of sks dog",
              "validation_prompt": validation_prompt, "optimizer": "scaled_adamw", "rank": 4, "max_train_steps": 10}
    write_model_card(tmp_path, config, "samples/step-10.png", 0.1, license="openrail++")
    return ModelCard.load(tmp_path / "README.md"), (tmp_path / "README.md").read_text()


def test_card_metadata_is_hub_valid_and_names_the_prompt_and_license(tmp_path):
    card, text = _card(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0", "a sks dog in snow | a sks dog on a bed")
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert card.data.license == "openrail++" and card.data.instance_prompt == "a photo of sks dog"
    assert card.data.library_name == "diffusers" and "lora" in card.data.tags
    assert "pipe('a sks dog in snow')" in text and "|" not in text.split("```python")[1].split("```")[0]


def test_local_base_model_is_named_in_the_text_not_the_metadata(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    card, text = _card(tmp_path, str(local), None)
    assert card.data.base_model is None and str(local) in text
    assert "pipe('a photo of sks dog')" in text  # no validation prompt: the instance prompt
