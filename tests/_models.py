"""Tiny models for the engine tests, built from configs (nothing is downloaded)."""
from collections import namedtuple
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 97


def tiny_gpt2(n_embd=32, n_layer=2, n_head=4, n_positions=32, tie=True):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_llama(**overrides):
    """overrides: config fields (attention_dropout, attn_implementation, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None, **overrides)
    return LlamaForCausalLM(cfg)


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForSequenceClassification(cfg)


class MLPClassifier(nn.Module):
    """Features [R, F] -> class logits; returns an object with .loss (mean CE over rows) and .logits."""

    def __init__(self, features=16, hidden=64, classes=5, norm=True, reduction="mean"):
        super().__init__()
        self.reduction = reduction
        self.fc1 = nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.rms = nn.RMSNorm(hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, input_ids, labels=None):
        h = self.norm(torch.tanh(self.fc1(input_ids)))
        logits = self.out(self.rms(torch.tanh(self.fc2(h))))
        loss = None if labels is None else F.cross_entropy(logits, labels, reduction=self.reduction)
        return SimpleNamespace(loss=loss, logits=logits)


class Scale(nn.Module):
    """A layer type the engine has no rule for."""

    def __init__(self, width):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.alpha


class MLPWithScale(MLPClassifier):
    def __init__(self):
        super().__init__()
        self.scale = Scale(64)

    def forward(self, input_ids, labels=None):
        h = self.scale(self.norm(torch.tanh(self.fc1(input_ids))))
        logits = self.out(self.rms(torch.tanh(self.fc2(h))))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


ClassifierOutput = namedtuple("ClassifierOutput", "loss logits")  # torch.compile traces its construction


class ConvClassifier(nn.Module):
    """Images (or signals, volumes) [R, C, *spatial] -> `body` -> flatten -> LayerNorm -> class logits; returns
    an object with .loss (mean CE over rows) and .logits. `input_shape` (one row's) sizes the head."""

    def __init__(self, body: nn.Module, input_shape, classes=3):
        super().__init__()
        self.body = body
        with torch.no_grad():
            width = body(torch.zeros(1, *input_shape)).numel()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, classes)

    def forward(self, input_ids, labels=None):
        logits = self.out(self.norm(self.body(input_ids).flatten(1)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ClassifierOutput(loss, logits)


def small_cnn():
    """Two Conv2d layers on [R, 3, 6, 6] images; with one validation row the first takes the projection path
    and the second (grouped, strided: 2x2 outputs) the Gram path."""
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, groups=2),
                         nn.Tanh())
    return ConvClassifier(body, (3, 6, 6))


def lm_batch(rows, seq_len, generator, pad_row=None):
    x = torch.randint(0, VOCAB, (rows, seq_len), generator=generator)
    y = x.clone()
    if pad_row is not None:  # right-padded sample: its last positions are not targets
        y[pad_row, seq_len // 2:] = -100
    return x, y
