"""The UNet's text conditioning for N rows, one type for every model family.

SD 1.x/2.x condition on the text encoder's hidden states alone. SDXL adds `added_cond_kwargs`: the second
text encoder's pooled embedding and six "micro-conditioning" numbers per image (original height and width,
crop top and left, target height and width; Podell et al. 2023, arXiv:2307.01952, sec. 2.2). Sampling, the
update and classifier-free guidance handle rows of a `TextConditioning` without knowing which family it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextConditioning:
    hidden: Tensor  # [N, L, D] encoder_hidden_states
    pooled: Tensor | None = None  # [N, P] SDXL: the pooled text embedding (added_cond_kwargs text_embeds)
    time_ids: Tensor | None = None  # [N, 6] SDXL: original size, crop top-left, target size

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> TextConditioning:
        return TextConditioning(**{f.name: _maybe(fn, getattr(self, f.name)) for f in fields(self)})

    def rows(self, index: Tensor) -> TextConditioning:
        """The rows picked by `index` (a long tensor or a slice)."""
        return self._map(lambda t: t[index])

    def repeat_interleave(self, repeats: int) -> TextConditioning:
        """Each row `repeats` times in a row: [c0, c0, c1, c1, ...]."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def expand(self, n: int) -> TextConditioning:
        """A one-row conditioning (the negative prompt) as `n` rows."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> TextConditioning:
        """On `device`; floating tensors in `dtype` when given."""
        return self._map(lambda t: t.to(device, dtype=dtype if dtype and t.is_floating_point() else None))

    def unet_kwargs(self) -> dict:
        """The keyword arguments of `UNet2DConditionModel.forward` this conditioning fills."""
        kwargs: dict = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def _maybe(fn, value):
    return None if value is None else fn(value)


def concat(items: Sequence[TextConditioning]) -> TextConditioning:
    """Rows of several conditionings, in order (all of one family)."""
    first = items[0]
    return TextConditioning(
        **{
            f.name: None if getattr(first, f.name) is None else torch.cat([getattr(c, f.name) for c in items])
            for f in fields(first)
        }
    )


def sdxl_time_ids(height: int, width: int, n: int) -> Tensor:
    """SDXL micro-conditioning for `n` images generated at height x width, uncropped: [n, 6] =
    (original h, w, crop top, left, target h, w), as the stock SDXL pipeline passes by default."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(n, 6)
