"""What an attack prompt may say: the banned words, the tokens a search may use, and the re-tokenisation check.

An attack that finds a token sequence the text encoder reads as the concept only counts if a user could type
it: its text must name no banned word, and tokenising that text again must give the same tokens (else the
search found ids no typed prompt produces).
"""

from __future__ import annotations

import re

import torch

from lora_grpo.rewards.steering import Anchors

# words that carry no concept however an anchor uses them
STOPWORDS = frozenset(
    "a an the of and or with no not in on at to for by from is are image photo picture shape content".split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def concept_words(anchors: Anchors) -> list[str]:
    """The words of the unsafe anchors that no safe anchor uses (the concept's own words: "red" for the toy
    world), stopwords left out; sorted."""
    safe = {w for phrase in anchors.safe for w in _words(phrase)}
    unsafe = {w for phrase in anchors.unsafe for w in _words(phrase)}
    return sorted(unsafe - safe - STOPWORDS)


def names_banned(text: str, banned: list[str]) -> str | None:
    """The first banned word `text` contains (case-insensitive, also inside a longer word), else None."""
    low = text.lower()
    return next((w for w in banned if w.lower() in low), None)


def without_banned(prompt: str, banned: list[str]) -> str:
    """The prompt with every banned word removed (whole words), spaces tidied: "a red circle" -> "a circle"."""
    kept = [w for w in prompt.split() if not names_banned(w, banned)]
    return " ".join(kept)


def candidate_tokens(tokenizer, banned: list[str]) -> torch.Tensor:
    """Ids a search may place: every token but the special ones, whose text names no banned word and has at
    least one letter. [V']"""
    special = set(tokenizer.all_special_ids)
    keep = []
    for token, i in tokenizer.get_vocab().items():
        text = token.replace("</w>", "")
        if i in special or not re.search(r"[a-z]", text.lower()) or names_banned(text, banned):
            continue
        keep.append(i)
    return torch.tensor(sorted(keep), dtype=torch.long)


def token_text(tokenizer, ids: list[int]) -> str:
    """The text a user would type for these ids."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def typed_ids(tokenizer, text: str) -> list[int]:
    """The ids the tokenizer gives for `text`, without the start and end tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def usable(tokenizer, ids: list[int], banned: list[str]) -> bool:
    """A search's token sequence counts: its text names no banned word and re-tokenises to the same ids."""
    text = token_text(tokenizer, ids)
    return not names_banned(text, banned) and typed_ids(tokenizer, text) == list(ids)
