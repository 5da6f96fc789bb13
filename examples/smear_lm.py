"""SMEAR-style merged experts in transformers models, without changing what the models mean.

1. A tiny causal LM (transformers' ``LlamaForCausalLM``, random init: nothing is downloaded)
   is converted so that every linear is a merge of K experts (``modweights.convert``), with
   causal segment routing (``routing_mode="segment"``: segment s is mixed by the router on the
   mean of segment s - 1, after Lory), and fine-tuned for a few steps on generated text:
   sequences counting up modulo the vocabulary, each with its own step (1, 2, 3 or 5), so
   the model must read the step from the earlier tokens. It then checks that the outputs at
   position t do not depend on later tokens, and that generation with the KV cache (inside
   ``modweights.decoding``) equals greedy decoding by full forward passes.
2. A tiny encoder classifier (``BertModel`` + a linear head) on padded sequences, converted
   with pooled routing: every linear is mixed per sample by its router on a mask-aware mean of
   the token embeddings (``modweights.masked_mean``), given with ``modweights.condition``. The
   label is whether token 1 occurs more often than token 2. It checks that extra padding leaves
   the logits unchanged.

Run from the repository root: ``python examples/smear_lm.py`` (about half a minute on a CPU,
most of it importing transformers); ``--quick`` trains fewer steps. The last line is
``RESULT smear_lm key=value ...``. See docs/sequence-models.md for the routing modes.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import modweights

V, K = 32, 4  # vocabulary, experts


def counting_text(n: int, T: int, g: torch.Generator) -> torch.Tensor:
    """``(n, T)`` token ids: start + step * t (mod V), a random start and a step from {1, 2, 3, 5}."""
    steps = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (n, 1), generator=g)]
    start = torch.randint(0, V, (n, 1), generator=g)
    return (start + steps * torch.arange(T)) % V


def causal_lm(steps: int, g: torch.Generator) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    report = modweights.convert(model, num_experts=K, routing_mode="segment", segment_length=4)
    print(report)
    # train the routers and the experts; embeddings, norms and attention are frozen as pretrained
    modweights.freeze_base(model, train_experts=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    test = counting_text(64, 16, g)
    with torch.no_grad():
        before = model(test, labels=test).loss.item()
    model.train()
    for step in range(steps):
        ids = counting_text(32, 16, g)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(test, labels=test).loss.item()
        # causality: change the tokens from position 10 on; positions 0..9 must not move
        changed = test.clone()
        changed[:, 10:] = (changed[:, 10:] + 7) % V
        leak = (model(changed).logits[:, :10] - model(test).logits[:, :10]).abs().max().item()
        # the KV cache: generate() inside decoding() vs greedy full forward passes
        prompt = test[:8, :6]
        model.generation_config.eos_token_id = None  # generate all 8 tokens (no early stop at an EOS id)
        with modweights.decoding(model):
            cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0)
        full = prompt
        for _ in range(8):
            full = torch.cat([full, model(full).logits[:, -1:].argmax(-1)], 1)
    print(f"causal LM: loss {before:.3f} -> {after:.3f} after {steps} steps; outputs at t < 10 moved by {leak:.1e} "
          f"when tokens >= 10 changed; cached generation {'equals' if torch.equal(cached, full) else 'DIFFERS FROM'} "
          "greedy full forward passes")
    return dict(lm_loss_before=before, lm_loss_after=after, causal_leak=leak,
                cache_equal=int(torch.equal(cached, full)))


def padded_batch(n: int, g: torch.Generator):
    """Sequences of 4..12 real tokens (ids 1..V-1) right-padded with 0 to 12; label: more 1s than 2s."""
    lengths = torch.randint(4, 13, (n,), generator=g)
    ids = torch.randint(1, 4, (n, 12), generator=g)  # mostly 1, 2, 3: the counts matter
    ids = torch.where(torch.rand(n, 12, generator=g) < 0.3, torch.randint(1, V, (n, 12), generator=g), ids)
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = ids * mask
    label = ((ids == 1).sum(1) > (ids == 2).sum(1)).long()
    return ids, mask, label


class Classifier(nn.Module):
    def __init__(self):
        from transformers import BertConfig, BertModel

        super().__init__()
        cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
        self.bert, self.head = BertModel(cfg, add_pooling_layer=False), nn.Linear(32, 2)

    def forward(self, ids, mask):
        # the router's input: the mean of the real tokens' embeddings (padding excluded)
        latent = modweights.masked_mean(self.bert.embeddings.word_embeddings(ids), mask)
        with modweights.condition(self.bert, latent):
            h = self.bert(ids, attention_mask=mask).last_hidden_state
        return self.head(modweights.masked_mean(h, mask))


def encoder_classifier(steps: int, g: torch.Generator) -> dict:
    model = Classifier()
    modweights.convert(model.bert, num_experts=K, style_features=32)  # routing_mode "cond"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids, mask, label = padded_batch(64, g)
        loss = F.cross_entropy(model(ids, mask), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, mask, label = padded_batch(512, g)
    with torch.no_grad():
        logits = model(ids, mask)
        acc = (logits.argmax(1) == label).float().mean().item()
        pad = torch.zeros(len(ids), 5, dtype=ids.dtype)  # 5 more padding tokens
        more = model(torch.cat([ids, pad], 1), torch.cat([mask, pad], 1))
    diff = (more - logits).abs().max().item()
    base = max((label == 1).float().mean().item(), (label == 0).float().mean().item())
    print(f"encoder classifier: accuracy {acc:.3f} (majority class {base:.3f}) after {steps} steps; 5 extra "
          f"padding tokens moved the logits by {diff:.1e}")
    return dict(cls_acc=acc, majority_acc=base, padding_diff=diff)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer training steps (a smoke run)")
    p.add_argument("--seeds", type=int, default=1, help="accepted for the examples' common command line; one seed")
    p.add_argument("--out", default=None, help="accepted for the examples' common command line; nothing is written")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    steps = 15 if args.quick else 60
    res = causal_lm(steps, g)
    res.update(encoder_classifier(steps, g))
    print("RESULT smear_lm " + " ".join(f"{k}={v:.6g}" for k, v in res.items()))


if __name__ == "__main__":
    main()
