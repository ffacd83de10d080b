"""What folding the norms enables: a residual stream that can be rotated without changing the model.

QuaRot, SpinQuant and SliceGPT multiply a transformer's residual stream by an
orthogonal matrix Q: every layer writing into the stream gets Qᵀ on its output,
every layer reading the normalized stream gets Q on its input. The model is
unchanged only if each norm commutes with Q. An RMSNorm without affine does
(‖xQ‖ = ‖x‖); one with γ does not (γ scales the channels Q mixes), and a
LayerNorm does not either (it subtracts the mean over the channels, which Q
moves). So:
- Llama (RMSNorm): `fold_norm_affine` takes γ out of every norm;
- GPT-2 (LayerNorm): `ln_to_rmsnorm` first centres the residual stream and turns
  each LayerNorm into an RMSNorm, then `fold_norm_affine`.

    python examples/rotation_invariance.py

Models are built from small configs, in float64; Hugging Face's RMSNorm computes
in float32 even there, so after the fold its (now weightless) norms are replaced
by torch's RMSNorm, which computes in the model's dtype.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import transformers

import normswap
from normswap.testing import randomize_norms

transformers.logging.set_verbosity_error()
VOCAB = 97


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return randomize_norms(transformers.LlamaForCausalLM(config), seed=seed).double().eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return randomize_norms(transformers.GPT2LMHeadModel(config), seed=seed).double().eval()


def float64_norms(model: nn.Module) -> nn.Module:
    """Each weightless Hugging Face RMSNorm replaced by torch's, which computes in the model's dtype."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm") and not isinstance(module, nn.RMSNorm):
            if not torch.all(module.weight == 1):
                raise ValueError(f"{name} still has an affine: fold it first")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    nn.RMSNorm(module.weight.shape[0], eps=module.variance_epsilon, elementwise_affine=False,
                               dtype=module.weight.dtype))
    return model


def orthogonal(d: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate_llama(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """Writers (embedding rows, o_proj, down_proj outputs) by Qᵀ; readers (q/k/v, gate/up, lm_head inputs) by Q."""
    model = copy.deepcopy(model)
    emb = model.model.embed_tokens.weight
    emb.copy_(emb @ q)
    for layer in model.model.layers:
        for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            w.copy_(q.T @ w)
        for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
                  layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight):
            w.copy_(w @ q)
    model.lm_head.weight.copy_(model.lm_head.weight @ q)
    return model


@torch.no_grad()
def rotate_gpt2(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """Conv1D stores (in, out): writers' weights and biases get Q on the right, readers' weights Qᵀ on the left."""
    model = copy.deepcopy(model)
    t = model.transformer
    for emb in (t.wte.weight, t.wpe.weight):
        emb.copy_(emb @ q)
    for block in t.h:
        for writer in (block.attn.c_proj, block.mlp.c_proj):
            writer.weight.copy_(writer.weight @ q)
            writer.bias.copy_(writer.bias @ q)
        for reader in (block.attn.c_attn, block.mlp.c_fc):
            reader.weight.copy_(q.T @ reader.weight)
    model.lm_head.weight.copy_(model.lm_head.weight @ q)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model: nn.Module, ids: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


def run(name: str, model: nn.Module, prepare, rotate) -> dict[str, float]:
    ids = {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))}
    folded = prepare(model, ids)
    q = orthogonal(folded.config.hidden_size)
    figures = {
        "folded vs original": rel(logits(folded, ids), logits(model, ids)),
        "rotated folded vs folded": rel(logits(rotate(folded, q), ids), logits(folded, ids)),
        "rotated original vs original (no fold)": rel(logits(rotate(model, q), ids), logits(model, ids)),
    }
    for what, value in figures.items():
        print(f"  {name:6} {what:40} max rel {value:.2e}")
    return figures


def prepare_llama(model: nn.Module, ids: dict) -> nn.Module:
    return float64_norms(normswap.apply(model, "fold_norm_affine", example_inputs=ids, check=True))


def prepare_gpt2(model: nn.Module, ids: dict) -> nn.Module:
    rms = normswap.apply(model, "ln_to_rmsnorm", example_inputs=ids, check=True, untie=True, add_bias=True)
    return normswap.apply(rms, "fold_norm_affine", example_inputs=ids, check=True, untie=True, add_bias=True)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print("rotating the residual stream by a random orthogonal Q (float64):")
    results = {"llama": run("llama", llama(), prepare_llama, rotate_llama),
               "gpt2": run("gpt2", gpt2(), prepare_gpt2, rotate_gpt2)}
    ok = all(r["rotated folded vs folded"] < 1e-12 and r["folded vs original"] < 1e-6
             and r["rotated original vs original (no fold)"] > 1e-2 for r in results.values())
    print("invariance holds after the fold, and only after it" if ok else "invariance NOT shown")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
