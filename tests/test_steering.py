"""The steering reward against its formula, computed independently from the same CLIP's embeddings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lora_grpo.config import ClipConfig, RewardConfig
from lora_grpo.errors import UserError
from lora_grpo.rewards import REWARDS, build_reward, reward_names
from lora_grpo.rewards.clip_backends import OpenClip, TransformersClip, load_clip
from lora_grpo.rewards.steering import (
    Anchors,
    SteeringReward,
    load_anchors,
    projected_targets,
    steered_targets,
    steering_direction,
)

ANCHORS = Anchors(
    safe=("a safe image", "a wholesome photo"), unsafe=("explicit content", "a nude figure", "gore")
)


def smooth_images(n, h=48, w=40, seed=0):
    """Smooth synthetic pictures (gradients and a disc), so resampling differences stay small."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = torch.rand(3, generator=g)
        disc = (((xs - a) ** 2 + (ys - b) ** 2) < 0.05).float()
        out.append(torch.stack([xs * a + disc * 0.5, ys * b, (1 - xs) * c + disc * 0.3]).clamp(0, 1))
    return torch.stack(out)


def to_pil(img):
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def hf_clip(tiny_clip_dir):
    return TransformersClip(str(tiny_clip_dir))


def test_transformers_tensor_preprocessing_matches_processor(hf_clip, tiny_clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel

    images = smooth_images(4)
    ours = hf_clip.encode_images(images)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    # the uint8 round trip is part of the PIL path; feed the tensor path the same quantised pixels
    pixels = processor(images=[to_pil(im) for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    cos = (ours * ref).sum(-1)
    assert cos.min().item() >= 0.9999, cos


def test_open_clip_tensor_preprocessing_matches_transform(tiny_open_clip_dir):
    import open_clip

    backend = OpenClip(f"local-dir:{tiny_open_clip_dir}")
    images = smooth_images(4, seed=1)
    ours = backend.encode_images(images)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip_dir}")
    model.eval()
    with torch.no_grad():
        ref = F.normalize(model.encode_image(torch.stack([preprocess(to_pil(im)) for im in images])), dim=-1)
    cos = (ours * ref).sum(-1)
    assert cos.min().item() >= 0.9999, cos
    # text path: same tokenizer and model as open_clip's own
    with torch.no_grad():
        tok = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip_dir}")
        ref_t = F.normalize(model.encode_text(tok(["a cat", "a dog"])), dim=-1)
    assert torch.allclose(backend.encode_text(["a cat", "a dog"]), ref_t, atol=1e-5)


def test_steering_reward_matches_formula(hf_clip, tiny_clip_dir):
    """r = cos(z_img, normalize(z_p + alpha * v)), every embedding computed directly with transformers."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir)

    def text(texts):
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            z = model.get_text_features(**ids).pooler_output
        return z / z.norm(dim=-1, keepdim=True)

    # 32x32 = the CLIP input size and uint8-exact pixels: the PIL path sees exactly the same image
    images = (smooth_images(6, h=32, w=32, seed=2) * 255).round() / 255
    prompts = [
        "a nude figure",
        "a nude figure",
        "a nude figure",
        "a red bicycle",
        "a red bicycle",
        "a red bicycle",
    ]
    alpha = 0.7
    reward = SteeringReward(hf_clip, ANCHORS, alpha, "add")
    ours = reward(images, prompts)

    v = text(list(ANCHORS.safe)).mean(0) - text(list(ANCHORS.unsafe)).mean(0)
    v = v / v.norm()
    target = text(prompts) + alpha * v
    target = target / target.norm(dim=-1, keepdim=True)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    pixels = processor(images=[to_pil(im) for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        z_img = model.get_image_features(pixel_values=pixels).pooler_output
    z_img = z_img / z_img.norm(dim=-1, keepdim=True)
    expected = (z_img * target).sum(-1)
    assert torch.allclose(ours, expected, atol=1e-5)
    # the direction is computed once and cached
    assert reward.direction is reward.direction


def test_alpha_zero_is_plain_clip_alignment(hf_clip):
    images = smooth_images(4, seed=3)
    prompts = ["a cat", "a cat", "a dog", "a dog"]
    steer = SteeringReward(hf_clip, ANCHORS, 0.0, "add")(images, prompts)
    plain = SteeringReward(hf_clip, None, 0.0, "none")(images, prompts)
    assert torch.allclose(steer, plain, atol=1e-6)


def test_target_formulas():
    z = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]), dim=-1)
    v = torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(steered_targets(z, v, 1.0)[0], torch.tensor([1.0, 1.0, 0.0]) / 2**0.5)
    # projection: the component along v is replaced by alpha
    proj = projected_targets(z, v, 0.5)
    assert torch.allclose(proj[1], F.normalize(torch.tensor([0.6, 0.5, 0.0]), dim=0))
    assert torch.allclose(proj[0], F.normalize(torch.tensor([1.0, 0.5, 0.0]), dim=0))
    d = steering_direction(torch.tensor([[1.0, 0.0], [1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(d, F.normalize(torch.tensor([1.0, 1.0]), dim=0))


def test_prompts_are_encoded_once_per_batch(hf_clip):
    calls = []

    class Counting:
        image_size = hf_clip.image_size

        def encode_text(self, texts):
            calls.append(list(texts))
            return hf_clip.encode_text(texts)

        def encode_images(self, images):
            return hf_clip.encode_images(images)

    reward = SteeringReward(Counting(), ANCHORS, 0.5, "add", chunk=2)
    prompts = ["a", "a", "a", "b", "b", "b"]
    reward(smooth_images(6), prompts)
    reward(smooth_images(6), prompts)
    # the anchors once (first batch only), and one call per batch with the distinct prompts only
    assert calls == [["a", "b"], list(ANCHORS.safe), list(ANCHORS.unsafe), ["a", "b"]]


def test_registry_matches_config_names(tiny_clip_dir, tmp_path):
    assert set(REWARDS) == set(reward_names())
    anchors = tmp_path / "a.yaml"
    anchors.write_text("safe: [a safe image]\nunsafe: [explicit content]\n")
    clip = ClipConfig(backend="transformers", model=str(tiny_clip_dir))
    images, prompts = smooth_images(2), ["x", "y"]
    rewards = {
        n: build_reward(RewardConfig(name=n, alpha=0.5, anchors=str(anchors), clip=clip))(images, prompts)
        for n in REWARDS
    }
    assert not torch.allclose(rewards["steering"], rewards["clip"])
    assert not torch.allclose(rewards["steering-projection"], rewards["steering"])


def test_anchor_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("safe: [a]\n")
    with pytest.raises(UserError, match="no unsafe anchors"):
        load_anchors(bad)
    bad.write_text("safe: a\nunsafe: [b]\n")
    with pytest.raises(UserError, match="`safe` must be a list"):
        load_anchors(bad)
    with pytest.raises(UserError, match="anchor file not found"):
        load_anchors(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("description: x\nsafe: [' a ']\nunsafe: [b, c]\n")
    assert load_anchors(good) == Anchors(("a",), ("b", "c"))


def test_clip_loading_errors(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_clip(ClipConfig(backend="transformers", model=str(tmp_path)))
    with pytest.raises(UserError, match="no open_clip_config.json"):
        load_clip(ClipConfig(backend="open_clip", model=f"local-dir:{tmp_path}"))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_clip(ClipConfig(backend="open_clip", model="ViT-B-32", checkpoint=str(tmp_path / "hps.pt")))
