"""CLIP-ReID two-stage prompt learning (Li, Sun and Li, AAAI 2023), on open_clip's text tower.

Stage 1 (here): every identity gets ``n_ctx`` learned token embeddings that fill the X slots of
the template ("A photo of a X X X X hand."). Both encoders stay frozen: the image features of
all train images are computed once, and only the identity tokens learn, with the image-to-text
and text-to-image contrastive losses of CLIP-ReID (its SupConLoss, loss/supcontrast.py: each
anchor against every item of the other modality in the batch, all of the anchor's identity
positives, its own counterpart among them). Stage 2 (the trainer) fine-tunes the image encoder
with ID + triplet losses plus ``loss.i2t``, the cross-entropy of :func:`image_to_text_logits`
against the identity texts learned here.

Similarity (``prompt.similarity``): ``dot`` is CLIP-ReID's code, the raw (unnormalised) features
multiplied at temperature 1. ``cosine`` L2-normalises both sides and multiplies by CLIP's logit
scale, 100 (OpenAI's models end training at that clamp, exp(4.6052)): the logits then do not
drift with the feature norms while the image encoder fine-tunes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from handclip.config import Config, PromptConfig
from handclip.data.transforms import EvalTransform
from handclip.engine.encoder import autocast
from handclip.errors import UserError
from handclip.progress import progress

LOGIT_SCALE = 100.0
PLACEHOLDER = "X"


class PromptLearner(nn.Module):
    """Per-identity prompt embeddings: the template's token embeddings with each class's
    ``n_ctx`` learned vectors in place of the X placeholders."""

    def __init__(self, backbone, num_classes: int, n_ctx: int, template: str,
                 generator: torch.Generator | None = None):
        super().__init__()
        tokens = _template_tokens(backbone, n_ctx, template)
        first = _placeholder_start(backbone, tokens, n_ctx, template)
        self.eot_position = int(tokens.argmax())  # CLIP's end-of-text token has the highest id
        with torch.no_grad():
            # Up to the end-of-text token only: the text transformer is causal, so the padding
            # after it never changes the feature taken there.
            embedding = backbone.token_embedding(tokens[None, :self.eot_position + 1].to(_device_of(backbone)))
        self.register_buffer("prefix", embedding[:, :first].clone())
        self.register_buffer("suffix", embedding[:, first + n_ctx:].clone())
        context = torch.randn(num_classes, n_ctx, embedding.shape[-1], generator=generator) * 0.02  # CLIP-ReID
        self.class_context = nn.Parameter(context.to(embedding.device))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Prompt token embeddings (B, L, width) of the identities ``labels``."""
        batch = len(labels)
        return torch.cat([self.prefix.expand(batch, -1, -1), self.class_context[labels],
                          self.suffix.expand(batch, -1, -1)], dim=1)

    def text_features(self, backbone, labels: torch.Tensor) -> torch.Tensor:
        """CLIP text features (B, E), not normalised, of the identities ``labels``."""
        eot = torch.full((len(labels),), self.eot_position, device=labels.device)
        return backbone.encode_text_embeddings(self(labels), eot)


def _template_tokens(backbone, n_ctx: int, template: str) -> torch.Tensor:
    if template.count("{}") != 1:
        raise UserError(f"config key 'prompt.template': {template!r} needs exactly one {{}} for the identity tokens")
    if n_ctx < 1:
        raise UserError(f"config key 'prompt.n_ctx': {n_ctx} must be >= 1")
    text = template.format(" ".join([PLACEHOLDER] * n_ctx))
    tokenizer = backbone.tokenizer
    if not isinstance(tokenizer, SimpleTokenizer):
        raise UserError(f"model.arch '{backbone.arch}': prompt learning needs CLIP's own tokenizer, "
                        f"this model uses {type(tokenizer).__name__}")
    length = len(tokenizer.encode(text)) + 2  # plus start- and end-of-text
    if length > tokenizer.context_length:
        raise UserError(f"config key 'prompt.template': {text!r} is {length} tokens, more than the "
                        f"{tokenizer.context_length} the text encoder of {backbone.arch} takes; shorten it or "
                        f"lower prompt.n_ctx")
    return tokenizer([text])[0]


def _placeholder_start(backbone, tokens: torch.Tensor, n_ctx: int, template: str) -> int:
    """Index of the first X token; the n_ctx X tokens must be the only ones and consecutive."""
    placeholder = backbone.tokenizer.encode(PLACEHOLDER)
    positions = (tokens == placeholder[0]).nonzero().flatten().tolist()
    if len(placeholder) != 1 or not positions or positions != list(range(positions[0], positions[0] + n_ctx)):
        raise UserError(f"config key 'prompt.template': {template!r} must not contain the word "
                        f"{PLACEHOLDER!r} itself, and {{}} must stand alone between words")
    return positions[0]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def similarity_logits(a: torch.Tensor, b: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """(len(a), len(b)) logits in float32: raw dot products (``dot``) or cosines × :data:`LOGIT_SCALE`."""
    a, b = a.float(), b.float()
    if similarity == "cosine":
        return LOGIT_SCALE * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    if similarity == "dot":
        return a @ b.T
    raise UserError(f"config key 'prompt.similarity': {similarity!r} is not cosine or dot")


def contrastive_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, others: torch.Tensor,
                     other_labels: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """CLIP-ReID's SupConLoss: for each anchor, the log-softmax of its logits against all ``others``,
    averaged over the others with its label (every one of them a positive, nothing left out);
    the mean over anchors. Every anchor needs at least one positive among ``others`` (in stage 1
    its own image or text always is)."""
    log_prob = similarity_logits(anchors, others, similarity).log_softmax(dim=1)
    positives = (anchor_labels[:, None] == other_labels[None, :]).float()
    return -((log_prob * positives).sum(dim=1) / positives.sum(dim=1)).mean()


def prompt_lr(epoch: int, prompt: PromptConfig, epochs: int) -> float:
    """Stage 1's learning rate in epoch ``epoch`` (0-based): CLIP-ReID's timm cosine schedule with
    linear warm-up, which its loop steps with the 1-based epoch before training it, so epoch
    index e runs at the schedule's value for t = e + 1."""
    t = epoch + 1
    if t < prompt.warmup_epochs:
        return prompt.warmup_lr + t * (prompt.lr - prompt.warmup_lr) / prompt.warmup_epochs
    if t >= epochs:
        return prompt.min_lr
    return prompt.min_lr + 0.5 * (prompt.lr - prompt.min_lr) * (1 + math.cos(math.pi * t / epochs))


@torch.no_grad()
def image_features(model, dataset, indices, device: torch.device, batch_size: int, amp: str = "auto") -> torch.Tensor:
    """CLIP image features (``backbone(...)["proj"]``, float32, not normalised) of ``indices``,
    eval preprocessing, the model in eval mode (no BatchNorm statistics change)."""
    transform = EvalTransform(model.image_size, model.mean, model.std)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(indices), batch_size):
        images = dataset.batch(indices[start:start + batch_size]).to(device)
        with autocast(device, amp):
            chunks.append(model.backbone(transform(images))["proj"].float())
    model.train(was_training)
    return torch.cat(chunks)


def train_prompts(backbone, features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: Config,
                  device: torch.device, quiet: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Stage 1 on precomputed image ``features`` (N, E) with ``labels`` (N,).

    Returns the text features of all classes (num_classes, E), detached — L2-normalised with
    ``prompt.similarity`` cosine, raw with dot — and the mean loss (i2t + t2i) of each epoch."""
    prompt = config.prompt
    generator = torch.Generator().manual_seed(config.train.seed)
    learner = PromptLearner(backbone, num_classes, prompt.n_ctx, prompt.template, generator).to(device)
    # torch's Adam adds the weight decay to the gradient (L2), as CLIP-ReID's optimiser does.
    optimizer = torch.optim.Adam(learner.parameters(), lr=prompt.lr, weight_decay=prompt.weight_decay)
    features, labels = features.to(device), labels.to(device)
    losses = []
    bar = progress(range(prompt.stage1_epochs), desc="stage 1: identity prompts", enabled=not quiet, unit="epoch")
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = prompt_lr(epoch, prompt, prompt.stage1_epochs)
        order = torch.randperm(len(labels), generator=generator).to(device)
        total = 0.0
        for batch in order.split(prompt.batch_size):
            batch_labels = labels[batch]
            # Each identity's text once per batch: the text tower is the expensive part.
            classes, inverse = batch_labels.unique(return_inverse=True)
            with autocast(device, config.train.amp):
                texts = learner.text_features(backbone, classes)[inverse]
            loss = (contrastive_loss(features[batch], batch_labels, texts, batch_labels, prompt.similarity)
                    + contrastive_loss(texts, batch_labels, features[batch], batch_labels, prompt.similarity))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(labels))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if losses and not quiet:
        print(f"stage 1: prompt loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} epochs")
    with torch.no_grad():
        texts = torch.cat([learner.text_features(backbone, classes)
                           for classes in torch.arange(num_classes, device=device).split(prompt.batch_size)])
    texts = texts.float()
    return (F.normalize(texts, dim=1) if prompt.similarity == "cosine" else texts), losses


def learn_identity_texts(model, dataset, labels: torch.Tensor, config: Config, device: torch.device,
                         quiet: bool = False) -> torch.Tensor:
    """The trainer's stage 1: the image features of the train images (dataset items
    ``range(len(labels))``) once, then :func:`train_prompts`; its (num_classes, E) texts."""
    num_classes = model.num_classes
    if len(labels) == 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} classes")
    features = image_features(model, dataset, range(len(labels)), device, config.train.eval_batch_size,
                              config.train.amp)
    texts, _ = train_prompts(model.backbone, features, labels, num_classes, config, device, quiet)
    return texts


def image_to_text_logits(image_global: torch.Tensor, text_features: torch.Tensor,
                         similarity: str = "cosine") -> torch.Tensor:
    """Stage 2 logits (B, classes) of the CLIP image features against the learned identity texts
    (:func:`similarity_logits`), in float32."""
    with torch.autocast(image_global.device.type, enabled=False):
        return similarity_logits(image_global, text_features, similarity)
