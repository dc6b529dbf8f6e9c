"""The fusions: question states and image tokens, each projected to the decoder's width, fused into the tokens
the decoder reads (its cross-attention memory, or the prefix of its input). Every parameter here is new, at
N(0, initializer_range), and trains under every `freeze` setting."""

import torch
from torch import nn

FusionOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, L, D)` states, `(B, L)` mask -> `(B, D)` mean over unmasked positions."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


class MeanFusion(nn.Module):
    """The book's fusion: mean question state (padding excluded) and mean image state (CLS included), each
    through one linear projection, averaged into a single memory token."""

    def __init__(self, question_dim: int, image_dim: int, dim: int):
        super().__init__()
        self.question_projection = nn.Linear(question_dim, dim)
        self.image_projection = nn.Linear(image_dim, dim)

    def forward(
        self, question_states: torch.Tensor, question_mask: torch.Tensor, image_states: torch.Tensor
    ) -> FusionOutput:
        """`(B, Lq, Dq)`, `(B, Lq)`, `(B, Li, Di)` -> memory `(B, 1, D)`, its mask `(B, 1)`, no question embedding."""
        question = self.question_projection(_masked_mean(question_states, question_mask))
        fused = (question + self.image_projection(image_states.mean(1))) / 2
        return fused.unsqueeze(1), question_mask.new_ones(question_mask.shape[0], 1), None


class SequenceFusion(nn.Module):
    """
    Every question token and image patch as its own memory position, projected and tagged with a learned
    modality embedding, optionally mixed by `layers` transformer layers so that patches can read the question
    (and words the image) before the decoder does. With layers, each patch also starts with the mean projected
    question added, so a layer's MLP can match every patch against the question directly, without first
    having to learn attention from patches to words (on the shapes demo: 64.7 % against 51.6 % after 1,000
    steps). The mean projected question is also returned, for the decoder's inputs. The same tokens are the
    prefix of `prefix` fusion. No normalisation of the memory: the encoders' outputs are layer-normed already, and a second norm was measured to slow learning
    several-fold on the shapes demo.
    """

    def __init__(self, question_dim: int, image_dim: int, dim: int, layers: int = 0, heads: int = 1):
        super().__init__()
        self.question_projection = nn.Linear(question_dim, dim)
        self.image_projection = nn.Linear(image_dim, dim)
        self.modality_embeddings = nn.Embedding(2, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )

    def forward(
        self, question_states: torch.Tensor, question_mask: torch.Tensor, image_states: torch.Tensor
    ) -> FusionOutput:
        """`(B, Lq, Dq)`, `(B, Lq)`, `(B, Li, Di)` -> memory `(B, Lq + Li, D)`, its mask `(B, Lq + Li)` and the
        question embedding `(B, D)`."""
        question = self.question_projection(question_states)
        question_embedding = _masked_mean(question, question_mask)
        image = self.image_projection(image_states) + self.modality_embeddings.weight[1]
        if self.layers:
            image = image + question_embedding.unsqueeze(1)
        memory = torch.cat([question + self.modality_embeddings.weight[0], image], dim=1)
        mask = torch.cat([question_mask, question_mask.new_ones(image_states.shape[:2])], dim=1)
        for layer in self.layers:
            memory = layer(memory, src_key_padding_mask=mask == 0)
        return memory, mask, question_embedding


__all__ = ["FusionOutput", "MeanFusion", "SequenceFusion"]
