"""Latents of drawn examples: a kept VAE posterior gives the draws a fresh encoding gives."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from difflora.data.image_set import ImageSet
from difflora.train.engine import LatentSource, encode_images, example_generator


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()


def _images(n: int, size: tuple[int, int]) -> list:
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_kept_posterior_draws_what_a_fresh_encoding_draws():
    vae = _vae()
    calls = []
    hook = vae.encoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    images = ImageSet([], ["p"] * 3, 16, images=_images(3, (16, 16)), seed=3)
    assert images.fixed_pixels
    reuse = LatentSource(vae, seed=5, cache=False, reuse=[True])
    batches = [[2 * step, 2 * step + 1] for step in range(4)]  # 8 draws of 3 images
    got = [reuse([images.draw(k, 2) for k in ks], 0, ks) for ks in batches]
    assert calls == [1, 1, 1]  # each image once, alone
    hook.remove()
    for ks, latents in zip(batches, got):
        pixels = [images.draw(k, 2).pixel_values for k in ks]
        want = torch.cat([encode_images(vae, px[None], [example_generator(5, 0, k)]) for px, k in zip(pixels, ks)])
        torch.testing.assert_close(latents, want, rtol=0, atol=0)  # the same eps per example, the same posterior


def test_pixels_that_can_change_are_never_kept():
    """Only sets whose draws cannot change an image's pixels are marked for reuse (the trainer builds
    its LatentSource from this flag; ``test_features_matter`` checks the VAE counts of a run)."""
    crops = ImageSet([], ["p"] * 2, 16, images=_images(2, (24, 16)), seed=3)  # landscape: the crop moves
    flips = ImageSet([], ["p"] * 2, 16, images=_images(2, (16, 16)), random_flip=True)
    centred = ImageSet([], ["p"] * 2, 16, images=_images(2, (24, 16)), center_crop=True)
    squares = ImageSet([], ["p"] * 2, 16, images=_images(2, (32, 32)))  # resized to the crop: no freedom
    assert not crops.fixed_pixels and not flips.fixed_pixels
    assert centred.fixed_pixels and squares.fixed_pixels
    # The crop really moves: two epochs of the landscape image give different pixels.
    assert not torch.equal(crops.example(0, 0).pixel_values, crops.example(0, 1).pixel_values)


def test_kept_posteriors_stay_under_the_memory_budget(monkeypatch):
    """Past the budget images are encoded every time, and their latents are the kept ones' bits."""
    import difflora.train.engine as engine

    vae = _vae()
    images = ImageSet([], ["p"] * 3, 16, images=_images(3, (16, 16)), seed=3)
    batches = [[2 * step, 2 * step + 1] for step in range(4)]
    unlimited = LatentSource(vae, seed=5, cache=False, reuse=[True])
    want = [unlimited([images.draw(k, 2) for k in ks], 0, ks) for ks in batches]
    one = sum(t.numel() * t.element_size() for t in next(iter(unlimited._posteriors.values())))
    monkeypatch.setattr(engine, "KEEP_POSTERIOR_BYTES", one)  # room for one image
    calls = []
    vae.encoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    budget = LatentSource(vae, seed=5, cache=False, reuse=[True])
    got = [budget([images.draw(k, 2) for k in ks], 0, ks) for ks in batches]
    assert len(budget._posteriors) == 1 and budget._kept_bytes == one
    draws = [images.draw(k, 2).pixel_values for ks in batches for k in ks]
    repeats_of_kept = sum(torch.equal(d, draws[0]) for d in draws) - 1  # the first image met is kept
    assert repeats_of_kept > 0 and len(calls) == len(draws) - repeats_of_kept
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
