"""LayerNorm/RMSNorm affine folding on Hugging Face language models: normswap's fold_norm_affine beside
llm-compressor's fuse_norm_linears and a plain float32 multiply.

    bash benchmarks/norm_fusion_env.sh      # once: benchmarks/.venv-llmc holds normswap and llmcompressor
    nice -n 10 benchmarks/.venv-llmc/bin/python benchmarks/norm_fusion.py [--hidden 256] [--layers 4]
        [--repeat 5] [--out benchmarks/results/norm_fusion.json]

Models, built from configs with random weights (never downloaded), every norm given a random affine
(normswap.testing.randomize_norms: Hugging Face initializes norms to the identity, where a fold that drops γ or β
goes unnoticed): Llama with a tied and with an untied lm_head (RMSNorm), Gemma (RMSNorm computing n·(1 + w) in
float32), GPT-2 (LayerNorm with bias, read by Conv1D layers storing their weight as (in, out)) and OPT (LayerNorm
with bias, nn.Linear readers); --hidden wide, --layers deep, untied unless named so.

Each model is copied into float32, float16 and bfloat16; each copy is folded by
- normswap: normswap.apply(model, "fold_norm_affine", example_inputs=ids, inplace=True): it finds each norm's
  readers from a recorded forward pass; every product and sum in float64, rounded once into the model's dtype;
- llm-compressor: llmcompressor.modeling.fuse.fuse_norm_linears(norm, linears), handed the linears of each norm
  (the mapping a user writes; for Llama the one llm-compressor's SpinQuant uses: input_layernorm -> q/k/v_proj,
  post_attention_layernorm -> gate/up_proj, model.norm -> lm_head when untied). It folds γ only (in float64) and
  sets the norm's weight to ones;
- f32 multiply: the same mapping, each reader's weight times γ (and its bias plus W·β, or β left on the norm as
  β/γ where a reader has no bias, as normswap does) computed in float32, then cast to the model's dtype.
Truth is the float32 model run in float64. The error of a model is max |logits - truth| / max |truth| on one
batch of token ids, printed beside the unfolded copy's own error in the same dtype. Fold time is the median
over --repeat runs of the fold alone, in place on a fresh copy (the copy is not timed), one thread; normswap's
includes its analysis pass, its check is off (run once more, untimed, to report whether it passes).

Coverage: the norms of each model, how many each tool folds, and, for llm-compressor, how many its own
default mappings (what SpinQuant infers for an unregistered architecture) reach without a hand-written mapping.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from _common import timeit  # noqa: F401 - also sets the import path

import normswap
from normswap.families import family_of
from normswap.testing import randomize_norms

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOOLS = ("normswap", "llm-compressor", "f32 multiply")
MODELS = ("llama tied", "llama", "gemma", "gpt2", "opt")

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------ models


def build(name: str, hidden: int, layers: int, vocab: int, seed: int = 0) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    family, tied = name.split()[0], name.endswith("tied")
    torch.manual_seed(seed)
    heads = max(hidden // 64, 4)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                  num_attention_heads=heads, tie_word_embeddings=tied, max_position_embeddings=128)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, tie_word_embeddings=tied,
            bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=heads // 2))
    elif family == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=vocab, hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=128,
            tie_word_embeddings=tied))
    elif family == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
            **common, num_key_value_heads=heads // 2, head_dim=hidden // heads))
    else:
        raise ValueError(name)
    return randomize_norms(model, seed=seed).float().eval()


def tokens(vocab: int, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}


# Hand-written mappings: norm name pattern -> its readers, relative to the norm's parent ("/" = from the root).
MAPPINGS = {
    "llama": [(r".*\.input_layernorm$", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
              (r".*\.post_attention_layernorm$", ["mlp.gate_proj", "mlp.up_proj"]),
              (r"^model\.norm$", ["/lm_head"])],
    "gpt2": [(r".*\.ln_1$", ["attn.c_attn"]), (r".*\.ln_2$", ["mlp.c_fc"]), (r"^transformer\.ln_f$", ["/lm_head"])],
    "opt": [(r".*\.self_attn_layer_norm$", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            (r".*layers\.\d+\.final_layer_norm$", ["fc1"]),
            (r"^model\.decoder\.final_layer_norm$", ["/lm_head"])],
}
MAPPINGS["gemma"] = MAPPINGS["llama"]


def hand_mapping(name: str, model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm path, reader paths) for every norm the hand-written mapping names; the final norm is left out of a
    model whose lm_head is tied to the embedding (folding γ into it would scale the embedding too)."""
    out = []
    tied = name.endswith("tied")
    for path, _ in model.named_modules():
        for pattern, readers in MAPPINGS[name.split()[0]]:
            if not re.match(pattern, path):
                continue
            parent = path.rsplit(".", 1)[0]
            paths = [r[1:] if r.startswith("/") else f"{parent}.{r}" for r in readers]
            if tied and paths == ["lm_head"]:
                continue
            out.append((path, paths))
    return out


def norm_paths(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if family_of(m) in ("layernorm", "rmsnorm")]


# ------------------------------------------------------------------ the three folds


def fold_normswap(model: nn.Module, ids: dict, name: str):
    return normswap.apply(model, "fold_norm_affine", example_inputs=ids, inplace=True, check=False,
                          return_report=True)


def fold_llmc(model: nn.Module, ids: dict, name: str):
    from llmcompressor.modeling.fuse import fuse_norm_linears

    for norm, readers in hand_mapping(name, model):
        fuse_norm_linears(model.get_submodule(norm), [model.get_submodule(r) for r in readers])
    return model, None


@torch.no_grad()
def fold_plain(model: nn.Module, name: str, compute: torch.dtype) -> nn.Module:
    """The fold as a user writes it from the mapping: each reader's weight times γ (and its bias plus W·β, or β
    left on the norm as β/γ where a reader has no bias, where normswap puts it too), computed in ``compute``,
    written back in the model's dtype."""
    offset = 1.0 if name.startswith("gemma") else 0.0
    for norm_path, readers in hand_mapping(name, model):
        norm = model.get_submodule(norm_path)
        gamma = norm.weight.to(compute) + offset
        beta = norm.bias.to(compute) if getattr(norm, "bias", None) is not None else None
        mods = [model.get_submodule(r) for r in readers]
        beta_in_bias = beta is not None and all(m.bias is not None for m in mods)
        for m in mods:
            conv1d = type(m).__name__ == "Conv1D"  # Hugging Face's Conv1D: weight (in, out)
            w = m.weight.to(compute).clone()  # .to() of a weight already in that dtype is the weight itself
            if beta_in_bias:
                m.bias.copy_(m.bias.to(compute) + (beta @ w if conv1d else w @ beta))
            m.weight.copy_(w * gamma[:, None] if conv1d else w * gamma)
        norm.weight.fill_(1.0 - offset)
        if beta is not None:
            norm.bias.copy_(torch.zeros_like(beta) if beta_in_bias else beta / gamma)
    return model


def fold_f32(model: nn.Module, ids: dict, name: str):
    """The naive fold: W·γ (and b + W·β) in float32, cast to the model's dtype once."""
    return fold_plain(model, name, torch.float32), None


FOLDS = {"normswap": fold_normswap, "llm-compressor": fold_llmc, "f32 multiply": fold_f32}


# ------------------------------------------------------------------ measuring


@torch.no_grad()
def logits(model: nn.Module, ids: dict) -> torch.Tensor:
    return model(**ids).logits


def rel_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def affine_left(before: nn.Module, after: nn.Module, paths: list[str]) -> dict:
    """Norms whose weight the tool removed or rewrote (folded, rightly or not), and those still carrying a β."""
    folded, beta_left = [], []
    for p in paths:
        m, old = after.get_submodule(p), before.get_submodule(p)
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if w is None or not torch.equal(w, old.weight):
            folded.append(p)
        if b is not None and bool((b != 0).any()):
            beta_left.append(p)
    return {"gamma_folded": len(folded), "beta_left": len(beta_left)}


def measure_tool(tool: str, model: nn.Module, ids: dict, name: str, truth: torch.Tensor, paths: list[str],
                 repeat: int) -> dict:
    res: dict = {}
    times = []
    for i in range(repeat + 1):  # the first run is a warm-up, not timed
        work = copy.deepcopy(model)
        try:
            t = time.perf_counter()
            folded, report = FOLDS[tool](work, ids, name)
            elapsed = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - a failure is a result
            return {"status": "error", "error": error_text(e)}
        if i:
            times.append(elapsed)
    res["time_s"] = statistics.median(times)
    res["rel_err"] = rel_error(logits(folded, ids), truth)
    res.update(affine_left(model, folded, paths))
    res["status"] = "ok"
    if tool == "normswap":
        res["skipped"] = {s["path"]: s["reason"] for s in report.skipped}
        _, checked = normswap.apply(model, "fold_norm_affine", example_inputs=ids, check=True, return_report=True)
        res["check_ok"] = checked.check_result.ok
        res["check_threshold"] = checked.check_result.threshold
    res["folded_model"] = folded
    return res


def llmc_default_reach(model: nn.Module) -> int:
    """Norms llm-compressor's default NormMappings (SpinQuant's fallback for any architecture) match."""
    from compressed_tensors import match_modules_set
    from llmcompressor.modifiers.transform.spinquant.norm_mappings import infer_norm_mapping_from_model

    reached = 0
    for mapping in infer_norm_mapping_from_model(model):
        try:
            reached += sum(1 for _ in match_modules_set(model, (mapping.norm, *mapping.linears)))
        except Exception:  # noqa: BLE001, S110 - a mapping that matches nothing raises in some versions
            pass
    return reached


def not_correctly_rounded(folded: nn.Module, exact: nn.Module, name: str) -> tuple[int, int]:
    """Elements of the readers' weights and biases that differ from the float64 fold rounded once to the model's
    dtype, and how many elements those parameters hold."""
    wrong = total = 0
    for _, readers in hand_mapping(name, exact):
        for r in readers:
            for pname, ref in exact.get_submodule(r).named_parameters():
                got = getattr(folded.get_submodule(r), pname)
                wrong += int((got != ref.to(got.dtype)).sum()) if got.shape == ref.shape else ref.numel()
                total += ref.numel()
    return wrong, total


def measure_model(name: str, args) -> dict:
    base = build(name, args.hidden, args.layers, args.vocab)
    ids = tokens(args.vocab)
    paths = norm_paths(base)
    truth = logits(copy.deepcopy(base).double(), ids)
    rec: dict = {"model": name, "norms": len(paths), "hand_mapping_norms": len(hand_mapping(name, base)),
                 "params": sum(p.numel() for p in base.parameters()),
                 "norm_class": type(base.get_submodule(paths[0])).__name__,
                 "llmc_default_mapping_reaches": llmc_default_reach(base), "dtypes": {}}
    if name.endswith("tied"):  # normswap's untie: true gives the lm_head its own copy, to take the final γ
        untied, report = normswap.apply(base, "fold_norm_affine", example_inputs=ids, check=True, untie=True,
                                        return_report=True)
        rec["normswap_untie"] = {"rel_err": rel_error(logits(untied, ids), truth), "skipped": len(report.skipped),
                                 **affine_left(base, untied, paths)}
    for dname, dtype in DTYPES.items():
        model = copy.deepcopy(base).to(dtype)
        row: dict = {"original": {"rel_err": rel_error(logits(model, ids), truth)}}
        exact = fold_plain(copy.deepcopy(model).double(), name, torch.float64)
        for tool in TOOLS:
            row[tool] = measure_tool(tool, model, ids, name, truth, paths, args.repeat)
            folded = row[tool].pop("folded_model", None)
            if folded is not None:
                wrong, total = not_correctly_rounded(folded, exact, name)
                row[tool]["not_correctly_rounded"] = {"elements": wrong, "of": total}
        rec["dtypes"][dname] = row
    return rec


# ------------------------------------------------------------------ printing


def cell(res: dict, own: float) -> str:
    if res["status"] == "error":
        return f"{'raises ' + res['error'].split(':')[0]:>26}"
    return f"{res['rel_err']:9.2e} ({res['rel_err'] / max(own, 1e-300):6.3g}x) {res['time_s'] * 1000:6.1f}ms"


def print_errors(records: list[dict]) -> None:
    print("\nerror of the logits against float64 truth (max abs error / max |truth|), in parentheses relative to "
          "the unfolded model's own error in that dtype; fold time (median, in place, copy not timed)")
    print(f"{'model':11} {'dtype':9} {'own error':>9} | " + " | ".join(f"{t:^26}" for t in TOOLS))
    for rec in records:
        for dname, row in rec["dtypes"].items():
            own = row["original"]["rel_err"]
            print(f"{rec['model']:11} {dname:9} {own:9.2e} | " + " | ".join(cell(row[t], own) for t in TOOLS))


def coverage(rec: dict) -> dict:
    row = rec["dtypes"]["float32"]
    out = {}
    for tool in TOOLS:
        r = row[tool]
        if r["status"] == "error":
            out[tool] = {"folded": 0, "result": "raises " + r["error"].split(":")[0]}
            continue
        own = row["original"]["rel_err"]
        ok = r["rel_err"] <= 4 * own + 1e-12
        out[tool] = {"folded": r["gamma_folded"], "beta_left": r["beta_left"],
                     "result": "right" if ok else f"WRONG, error {r['rel_err']:.2g}"}
    return out


def coverage_cell(cov: dict, rec: dict, tool: str, width: int) -> str:
    x = cov[tool]
    beta = f", β kept {x['beta_left']}" if x.get("beta_left") else ""
    text = f"{x['folded']}/{rec['norms']} {x['result']}"
    return (text[:width - len(beta)] + beta).ljust(width)


def print_coverage(records: list[dict]) -> None:
    print("\ncoverage (float32 copies): norms whose weight the tool folded / norms in the model; 'right': the "
          "folded model's error within 4x the unfolded model's own float32 error; 'β kept': norms left with a β")
    print(f"{'model':11} {'norm class':13} | {'normswap (no mapping)':23} | {'llm-compressor (hand mapping)':32} | "
          f"{'llmc defaults':>13} | {'f32 multiply (hand mapping)':23}")
    for rec in records:
        cov = coverage(rec)
        print(f"{rec['model']:11} {rec['norm_class'][:13]:13} | {coverage_cell(cov, rec, 'normswap', 23)} | "
              f"{coverage_cell(cov, rec, 'llm-compressor', 32)} | "
              f"{str(rec['llmc_default_mapping_reaches']) + '/' + str(rec['norms']):>13} | "
              f"{coverage_cell(cov, rec, 'f32 multiply', 23)}")
    print("llmc defaults: norms llm-compressor's own default NormMappings (what SpinQuant falls back to for an "
          "architecture it has no entry for) match, without a hand-written mapping")
    for rec in records:
        sk = rec["dtypes"]["float32"]["normswap"].get("skipped") or {}
        for path, why in sk.items():
            print(f"normswap left {rec['model']}: {path}: {why}")
        if "normswap_untie" in rec:
            u = rec["normswap_untie"]
            print(f"normswap untie=True on {rec['model']}: {u['gamma_folded']}/{rec['norms']} folded, error "
                  f"{u['rel_err']:.2e} in float32 (own {rec['dtypes']['float32']['original']['rel_err']:.2e})")
        for tool in ("llm-compressor",):
            r = rec["dtypes"]["float32"][tool]
            if r["status"] == "error":
                print(f"{tool} on {rec['model']} raises {r['error']}")


def summary(records: list[dict]) -> dict:
    out: dict = {}
    for dname in DTYPES:
        for tool in TOOLS:
            ratios = [r["dtypes"][dname][tool]["rel_err"] / r["dtypes"][dname]["original"]["rel_err"]
                      for r in records if r["dtypes"][dname][tool]["status"] == "ok"]
            out.setdefault(dname, {})[tool] = {"median_error_over_own": statistics.median(ratios) if ratios else None,
                                               "max_error_over_own": max(ratios) if ratios else None}
    for peer in ("llm-compressor", "f32 multiply"):
        both = [(r["dtypes"][d]["normswap"]["time_s"], r["dtypes"][d][peer]["time_s"]) for r in records
                for d in DTYPES if r["dtypes"][d]["normswap"]["status"] == "ok"
                and r["dtypes"][d][peer]["status"] == "ok"]
        out[f"time_normswap_over_{peer}"] = {
            "median_per_model_ratio": statistics.median(a / b for a, b in both) if both else None,
            "runs": len(both)}
    return out


def print_summary(s: dict, records: list[dict]) -> None:
    print("\nmedian (max) of folded error / own error, over the models each tool folds without raising:")
    for dname in DTYPES:
        cells = []
        for tool in TOOLS:
            x = s[dname][tool]
            cells.append(f"{tool} {x['median_error_over_own']:.3f} ({x['max_error_over_own']:.3g})"
                         if x["median_error_over_own"] is not None else f"{tool} n/a")
        print(f"  {dname:9} " + "; ".join(cells))
    for peer in ("llm-compressor", "f32 multiply"):
        x = s[f"time_normswap_over_{peer}"]
        if x["runs"]:
            print(f"fold time normswap / {peer}: median per-run ratio {x['median_per_model_ratio']:.1f}x "
                  f"({x['runs']} model x dtype runs)")
    runs = [r["dtypes"][d]["normswap"] for r in records for d in DTYPES]
    print(f"normswap's own check (check=True) passed on {sum(bool(r.get('check_ok')) for r in runs)}/{len(runs)} "
          "model x dtype runs")
    print("reader weight and bias elements not equal to the float64 fold rounded once to the model's dtype "
          "(of all elements of the readers the mapping names):")
    for rec in records:
        cells = []
        for tool in ("normswap", "f32 multiply"):
            cells.append(tool + " " + ", ".join(
                f"{d} {v[tool]['not_correctly_rounded']['elements']}" for d, v in rec["dtypes"].items()
                if "not_correctly_rounded" in v[tool]))
        total = rec["dtypes"]["float32"]["f32 multiply"]["not_correctly_rounded"]["of"]
        print(f"  {rec['model']:11} of {total}: " + "; ".join(cells))


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5, help="timed folds per model, tool and dtype (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "norm_fusion.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import llmcompressor
    except ImportError:
        raise SystemExit("llmcompressor is not installed here: run this script with benchmarks/.venv-llmc/bin/python "
                         "(bash benchmarks/norm_fusion_env.sh creates it)") from None
    import transformers
    from loguru import logger

    logger.remove()  # llm-compressor's import-time device warnings
    names = args.models.split(",") if args.models else list(MODELS)
    print(f"normswap {normswap.__version__}, llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; models {args.hidden} wide, {args.layers} layers, vocab "
          f"{args.vocab}, 2x16 tokens, {args.threads} thread(s)")
    t0 = time.perf_counter()
    records = []
    for name in names:
        records.append(measure_model(name, args))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print_errors(records)
    print_coverage(records)
    s = summary(records)
    print_summary(s, records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "repeat": args.repeat,
                     "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                     "llmcompressor": llmcompressor.__version__, "normswap": normswap.__version__},
        "models": records, "coverage": {r["model"]: coverage(r) for r in records}, "summary": s,
        "wall_s": time.perf_counter() - t0}, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
