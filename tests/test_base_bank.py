"""Several bases in one run (`model.bases`): each epoch samples and trains one LoRA on its base, the others
wait on the CPU, and the first base is back for evaluation and checkpoints."""

from __future__ import annotations

import pytest
import torch

from lora_grpo.config import load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import find_recipe


@pytest.fixture(scope="module")
def fine_tuned_dir(tiny_sd_dir, tmp_path_factory):
    """A 'fine-tune' of the tiny base: every UNet weight moved a little, everything else the same."""
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import load_pipeline

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    out = tmp_path_factory.mktemp("fine-tune") / "tiny-ft"
    pipe.save_pretrained(out)
    return out


def _overrides(tiny_sd_dir, tiny_clip_dir, *extra):
    base = [f"model.base={tiny_sd_dir}", f"reward.clip.model={tiny_clip_dir}", "train.optimizer=adamw"]
    return [*base, "output.sample_grid_every=0", "evaluate.every=0", *extra]


def _probe(unet, encode):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(x, torch.tensor([500, 100]), **encode(["a cat", "a dog"]).unet_kwargs()).sample


def test_each_epoch_trains_on_its_base_and_the_first_comes_back(
    tiny_sd_dir, tiny_clip_dir, fine_tuned_dir, tmp_path
):
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import load_pipeline, lora_state_dict
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"),
        _overrides(tiny_sd_dir, tiny_clip_dir, f"model.bases=[{fine_tuned_dir}]", "train.epochs=2"),
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    unet, encode = trainer.model.unet, trainer.model.encode
    with torch.no_grad():
        for p in trainer.learner.params:  # a LoRA far from zero, so base and LoRA both show in the output
            p.add_(0.2 * torch.randn_like(p))
    first = _probe(unet, encode)

    # base 1 in the training UNet == the fine-tune loaded from disk with the same LoRA weights
    trainer.bases.use(1)
    other = load_pipeline(ModelConfig(base=str(fine_tuned_dir))).unet
    from lora_grpo.config import LoraSettings
    from lora_grpo.models import add_lora

    add_lora(other, LoraSettings(rank=config.lora.rank, alpha=config.lora.alpha))
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(other, {k: v for k, v in unet.state_dict().items() if "lora_" in k})
    assert torch.allclose(_probe(unet, encode), _probe(other, encode), atol=1e-6)
    assert (_probe(unet, encode) - first).abs().max() > 1e-3
    trainer.bases.use(0)
    assert torch.equal(_probe(unet, encode), first)  # exactly the first base again

    # epoch e samples on base e mod 2; after each epoch the first base is in place
    probe_weight = next(n for n, _ in unet.named_parameters() if "lora_" not in n and n.endswith("weight"))
    seen = []
    sample = trainer.sample_epoch
    trainer.sample_epoch = lambda epoch: (
        seen.append(unet.get_parameter(probe_weight).clone()),
        sample(epoch),
    )[1]
    lora_before = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    for epoch in (0, 1):
        trainer.run_epoch(epoch)
        assert torch.equal(
            unet.get_parameter(probe_weight),
            trainer.bases.weights[0][probe_weight.replace(".base_layer", "")],
        )
    plain = probe_weight.replace(".base_layer", "")
    assert torch.equal(seen[0], trainer.bases.weights[0][plain])
    assert torch.equal(seen[1], trainer.bases.weights[1][plain])
    assert any(
        not torch.equal(a, b)
        for a, b in zip(lora_before.values(), lora_state_dict(unet).values(), strict=True)
    )


def test_bases_of_another_architecture_or_listed_twice_are_one_line(
    tiny_sd_dir, tiny_sdxl_dir, tiny_clip_dir, tmp_path
):
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"), _overrides(tiny_sd_dir, tiny_clip_dir, f"model.bases=[{tiny_sdxl_dir}]")
    )
    with pytest.raises(UserError, match="is not the architecture of model.base"):
        Trainer(config, tmp_path, log=lambda line: None)
    with pytest.raises(UserError, match="lists a base twice"):
        load_config(
            find_recipe("tiny-test"), _overrides(tiny_sd_dir, tiny_clip_dir, f"model.bases=[{tiny_sd_dir}]")
        )
