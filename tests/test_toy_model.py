"""The shipped toy model: loads through from_pretrained, samples, and follows the prompt's colour."""
import random

import torch

import common
import rewards
import toy_world


def test_toy_model_loads_and_follows_colour(toy_model):
    assert toy_model.family == "toy" and toy_model.prediction == "flow" and toy_model.vae is None
    assert type(toy_model.denoiser).__name__ == "WanTransformer3DModel"
    prompts = random.Random(0).sample([p for p in toy_world.TRAIN_PROMPTS if "pushing" not in p], 24)
    _, videos = common.sample(toy_model, prompts, list(range(24)), 8, 32, 32, steps=8, guidance=3.0)
    assert videos.shape == (24, 8, 3, 32, 32) and 0 <= videos.min() and videos.max() <= 1
    acc = rewards.ToyReward().color_accuracy(videos, prompts).mean().item()
    assert acc >= 0.8, acc  # conditioning works: the colour detector agrees with the prompt
    # and the caption matters: the same seeds with every colour swapped give the swapped colours
    swapped = [p.replace("red", "TMP").replace("blue", "red").replace("TMP", "blue") for p in prompts]
    _, other = common.sample(toy_model, swapped, list(range(24)), 8, 32, 32, steps=8, guidance=3.0)
    changed = torch.tensor([a != b for a, b in zip(prompts, swapped)])
    assert rewards.ToyReward().color_accuracy(other[changed], [s for s, c in zip(swapped, changed) if c]).mean() >= 0.8
