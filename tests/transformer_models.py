"""Small Hugging Face language models built from configs (never downloaded), for the transformer tests."""
import torch
import transformers

from normswap.testing import randomize_norms

transformers.logging.set_verbosity_error()
VOCAB = 97


def build(name: str, *, tied: bool, seed: int = 0) -> torch.nn.Module:
    """GPT-2 (Conv1D, LayerNorm), Llama (RMSNorm, grouped-query attention), OPT (LayerNorm with bias) or Gemma
    (RMSNorm times 1 + weight), two layers wide 32, with random norm affines, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, tie_word_embeddings=tied)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tied,
            bos_token_id=0, eos_token_id=0))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    elif name == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64, tie_word_embeddings=tied))
    elif name == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common, num_key_value_heads=2, head_dim=8))
    else:
        raise ValueError(name)
    return randomize_norms(model, seed=seed).eval()


def tokens(seed: int = 0, batch: int = 2, length: int = 7) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=gen)}
