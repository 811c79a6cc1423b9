"""Alignment-guided decoding: keep a decode's attention moving through the text, in order.

The guided heads (``MelleConfig.guided_heads``, trained with the diagonal guided-attention
loss) attend to the text token being spoken. A free-running decode drifts: those heads jump
ahead to the end of the text (the rest of the sentence is skipped or slurred) or fall back
(words repeat), and the stop head fires early or late. The guide tracks the text position
from their attention after each step and, for the next step:

- biases the guided heads toward a window around that position (``off_window`` elsewhere),
- moves the position on by one token when it has not advanced for ``stall_steps``,
- holds the stop until the position reaches the last tokens, and forces it ``end_steps``
  steps after it got there.

The step graph takes the bias as an input and returns the guided heads' attention (plain
ONNX ops), so every backend runs the same rule from this one module. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGN_BIAS = "align_bias"  # step graph input [B, past_len]: added to the guided heads' scores
ALIGN_ATTENTION = "align_attention"  # step graph output [B, past_len]: guided heads' mean attention

# Stop logits the guide substitutes for the stop head's: far beyond any threshold, still finite.
HOLD_STOP, FORCE_STOP = -1e4, 1e4


@dataclass(frozen=True)
class AlignOptions:
    behind: int = 1  # tokens before the position the guided heads may attend to
    ahead: int = 6  # tokens after it (phonemes: about one per step at r = 4)
    off_window: float = -12.0  # bias on the text outside the window (a weight of ~6e-6)
    stall_steps: int = 12  # steps without progress after which the position moves on a token
    end_tokens: int = 3  # the stop may fire once the position is this close to the end (EOS included)
    end_steps: int = 8  # steps spent there after which the stop is forced

    def __post_init__(self) -> None:
        for name in ("behind", "ahead", "stall_steps", "end_tokens", "end_steps"):
            if getattr(self, name) < (0 if name == "behind" else 1):
                raise ValueError(f"AlignOptions.{name} must be at least {0 if name == 'behind' else 1}, "
                                 f"got {getattr(self, name)}")
        if not self.off_window < 0:
            raise ValueError(f"AlignOptions.off_window must be negative, got {self.off_window}")


class AlignmentGuide:
    """Per row of a decode: where in the text (``n_text`` tokens, EOS last) it is.

    ``start`` is the first token of the text to speak (after a prompt's transcript).
    """

    def __init__(self, n_text: int, batch: int, start: int = 0, options: AlignOptions = AlignOptions()):
        if not 0 <= start < n_text:
            raise ValueError(f"the text to speak starts at token {start} of {n_text}")
        self.n_text, self.options = n_text, options
        self.position = np.full(batch, start, np.int64)
        self.stalled = np.zeros(batch, np.int64)  # steps since the position last moved
        self.at_end = np.zeros(batch, np.int64)  # steps with the position among the last tokens
        self.end = max(start, n_text - options.end_tokens)

    def window(self) -> np.ndarray:
        """Which text tokens ``[B, n_text]`` each row's guided heads may attend to now."""
        offset = np.arange(self.n_text)[None, :] - self.position[:, None]
        return (offset >= -self.options.behind) & (offset <= self.options.ahead)

    def bias(self) -> np.ndarray:
        """The next step's bias over the text ``[B, n_text]``: 0 in each row's window."""
        return np.where(self.window(), 0.0, self.options.off_window).astype(np.float32)

    def observe(self, attention: np.ndarray) -> None:
        """Move each row's position after a step, from the guided heads' attention ``[B, n_text]``."""
        seen = np.where(self.window(), attention, -np.inf).argmax(axis=1)
        moved = seen > self.position
        self.stalled = np.where(moved, 0, self.stalled + 1)
        stuck = self.stalled >= self.options.stall_steps
        self.position = np.minimum(np.where(moved, seen, self.position + stuck), self.n_text - 1)
        self.stalled[stuck] = 0
        self.at_end += self.position >= self.end

    def gate_stop(self, stop: np.ndarray) -> np.ndarray:
        """The stop logits ``[B]`` with the stop held before the end of the text and forced after it."""
        held = np.where(self.position < self.end, HOLD_STOP, stop)
        return np.where(self.at_end >= self.options.end_steps, FORCE_STOP, held).astype(np.float32)
