"""Make the small, deterministic fixtures the tests and smoke runs use (no network, no hub).

    python scripts/make_fixtures.py [--out fixtures]

Writes, under --out:
  openscience/openscience.jsonl   science Q&A rows in nvidia/OpenScience's format
  tokenizer/                      byte-level BPE trained on those rows, Qwen chat tokens and template
  models/tiny-qwen3/              random Qwen3 (hidden 64, 2 layers) + the tokenizer, for CPU tests
  models/small-qwen3/             random Qwen3 (hidden 128, 4 layers) + the tokenizer, for GPU smoke
and, only when asked (`--only model --model qwen3-8b-4layer`; ~1.5 GB, never committed):
  models/qwen3-8b-4layer/         random Qwen3 with Qwen3-8B's layer shapes, 4 layers, the fixture
                                  vocabulary: step times of real-sized GEMMs on one GPU

Rerunning gives byte-identical files (seeded generators, seeded init, sorted JSON), which
tests/fixtures_test/ checks. Heavy imports (torch, transformers) stay inside the functions
that need them so `--only data` is fast.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20251123
NUM_ROWS = 400
VOCAB_SIZE = 3000
# Qwen's chat/special tokens. `<think>`/`</think>` are added but not special, as in Qwen3.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>"]

# Modelled on Qwen3's template (system, user, assistant turns; reasoning split on </think>
# and re-rendered as `<think>\n...\n</think>\n\n` for assistant turns after the last user turn),
# without tool calls. Written for these fixtures, so it stays small.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Qwen2/3's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MODELS = {
    # name: Qwen3Config sizes; dims are multiples of 32 so MX (32) and NVFP4 (16) blocks fit.
    "tiny-qwen3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128),
    "small-qwen3": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, intermediate_size=384),
}
ON_DEMAND_MODELS = {
    # Qwen/Qwen3-8B's config.json, 4 of its 36 layers; the vocabulary stays the fixture's.
    "qwen3-8b-4layer": dict(hidden_size=4096, num_hidden_layers=4, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                            max_position_embeddings=40960),
}


# ----------------------------------------------------------------------------------- data rows
Problem = tuple[str, float, str, list[str]]  # question stem, answer value, unit, reasoning steps


def _kinematics(rng: random.Random) -> Problem:
    a, t = rng.choice([0.5, 1.5, 2.0, 2.5, 3.2, 4.0]), rng.randint(2, 20)
    d = 0.5 * a * t * t
    return (f"A cart starts from rest and accelerates uniformly at {a} m/s² for {t} s. "
            "How far does it travel?", d, "m",
            [f"Uniform acceleration from rest: d = ½·a·t².",
             f"d = 0.5 × {a} m/s² × ({t} s)² = 0.5 × {a} × {t * t} = {d:.4g} m."])


def _ohm(rng: random.Random) -> Problem:
    v, r = rng.choice([1.5, 3.3, 5.0, 9.0, 12.0, 24.0]), rng.choice([2.2, 4.7, 10.0, 47.0, 100.0])
    return (f"A {v} V source drives a {r} Ω resistor. What current flows?", v / r, "A",
            ["Ohm's law: I = V / R.", f"I = {v} V / {r} Ω = {v / r:.4g} A."])


def _ideal_gas(rng: random.Random) -> Problem:
    n, temp, vol = rng.choice([0.5, 1.0, 2.0, 3.5]), rng.choice([273.15, 298.0, 350.0]), rng.choice([10.0, 22.4, 50.0])
    p = n * 0.082057 * temp / vol
    return (f"{n} mol of an ideal gas at T = {temp} K occupies {vol} L. What is its pressure?", p, "atm",
            ["Ideal gas law: PV = nRT, so P = nRT / V, with R = 0.082057 L·atm/(mol·K).",
             f"P = {n} × 0.082057 × {temp} / {vol} = {p:.4g} atm."])


def _photon(rng: random.Random) -> Problem:
    e = rng.choice([1.8, 2.1, 2.5, 3.1, 4.0, 6.2])
    return (f"What is the wavelength λ of a photon with energy E = {e} eV?", 1239.84 / e, "nm",
            ["E = hc/λ, so λ = hc/E; hc ≈ 1239.84 eV·nm.", f"λ = 1239.84 / {e} = {1239.84 / e:.4g} nm."])


def _half_life(rng: random.Random) -> Problem:
    n0, half, k = rng.choice([100, 640, 1000, 4096]), rng.choice([5.3, 8.0, 12.3, 30.0]), rng.randint(1, 6)
    t = half * k
    return (f"A sample holds {n0} mg of an isotope with t½ = {half} years. How much remains after {t:.4g} years?",
            n0 * 0.5 ** k, "mg",
            [f"N(t) = N₀ · 2^(−t/t½); t/t½ = {t:.4g}/{half} = {k}.", f"N = {n0} × 2^(−{k}) = {n0 * 0.5 ** k:.4g} mg."])


def _pendulum(rng: random.Random) -> Problem:
    length = rng.choice([0.25, 0.5, 1.0, 2.0, 9.81])
    period = 2 * math.pi * math.sqrt(length / 9.81)
    return (f"What is the small-angle period of a simple pendulum of length {length} m (g = 9.81 m/s²)?",
            period, "s",
            ["For small θ the period is T = 2π√(L/g).",
             f"T = 2π × √({length}/9.81) = 2π × {math.sqrt(length / 9.81):.4g} = {period:.4g} s."])


def _lc_circuit(rng: random.Random) -> Problem:
    ind, cap = rng.choice([10, 47, 100, 220]), rng.choice([1, 4.7, 10, 33])
    f = 1 / (2 * math.pi * math.sqrt(ind * 1e-6 * cap * 1e-9)) / 1e3
    return (f"An LC circuit has L = {ind} μH and C = {cap} nF. What is its resonant frequency?", f, "kHz",
            ["Resonance: f₀ = 1 / (2π√(LC)).",
             f"LC = {ind}×10⁻⁶ H × {cap}×10⁻⁹ F = {ind * cap:.4g}×10⁻¹⁵ s².",
             f"f₀ = {f:.4g} kHz."])


def _heat(rng: random.Random) -> Problem:
    m, dt = rng.choice([0.2, 0.5, 1.0, 2.5]), rng.choice([5, 12, 20, 37])
    q = m * 4186 * dt / 1000
    return (f"How much heat raises {m} kg of water by ΔT = {dt} °C (c = 4186 J/(kg·°C))?", q, "kJ",
            ["Q = m·c·ΔT.", f"Q = {m} × 4186 × {dt} J = {q:.4g} kJ."])


def _hardy_weinberg(rng: random.Random) -> Problem:
    q2 = rng.choice([0.01, 0.04, 0.09, 0.16, 0.25])
    q = math.sqrt(q2)
    return (f"In a population in Hardy–Weinberg equilibrium, {q2 * 100:.0f}% show the recessive phenotype. "
            "What fraction are heterozygous carriers?", 2 * (1 - q) * q, "",
            [f"q² = {q2}, so q = √{q2} = {q:.3g} and p = 1 − q = {1 - q:.3g}.",
             f"Carriers: 2pq = 2 × {1 - q:.3g} × {q:.3g} = {2 * (1 - q) * q:.4g}."])


PROBLEMS: list[Callable[[random.Random], Problem]] = [
    _kinematics, _ohm, _ideal_gas, _photon, _half_life, _pendulum, _lc_circuit, _heat, _hardy_weinberg,
]
FILLER = [
    "Let me double-check the units: every quantity is in SI or consistently scaled, so the result is in {unit}.",
    "Could I have misread the question? Re-reading it, the given values are used exactly once.",
    "A rough estimate: the order of magnitude of {value:.2g} {unit} looks physically plausible.",
    "Checking the other options: none of them matches the computed value to three significant figures.",
    "Approximating π ≈ 3.14 or √2 ≈ 1.41 would not move the answer to another option.",
    "Sanity check with dimensional analysis — [result] = {unit}, as expected.",
]


# Extra words for the tokenizer's training text only: the templated rows alone give too few
# distinct words for a vocabulary of a few thousand.
GLOSSARY = """
hydrogen helium lithium beryllium boron carbon nitrogen oxygen fluorine neon sodium magnesium
aluminium silicon phosphorus sulfur chlorine argon potassium calcium scandium titanium vanadium
chromium manganese iron cobalt nickel copper zinc gallium germanium arsenic selenium bromine krypton
proton neutron electron photon neutrino quark gluon boson fermion entropy enthalpy momentum torque
inertia viscosity buoyancy friction velocity acceleration displacement impulse oscillation frequency
amplitude wavelength diffraction interference polarization refraction reflection dispersion lens
mitochondria ribosome chloroplast nucleus membrane cytoplasm enzyme substrate catalyst protein
lipid carbohydrate glucose fructose sucrose cellulose chitin keratin collagen hemoglobin insulin
allele genotype phenotype dominant recessive heterozygous homozygous mutation selection drift
mitosis meiosis chromosome chromatid centromere telomere transcription translation replication
oxidation reduction electrolysis titration equilibrium buffer acid base alkaline molarity molality
isotope radioactive decay fission fusion half-life spectroscopy chromatography crystallography
thermodynamics kinetics electrostatics magnetostatics electromagnetism relativity quantum lattice
semiconductor superconductor dielectric capacitor inductor transistor diode resistor impedance
α β γ δ ε ζ η θ ι κ λ μ ν ξ π ρ σ τ υ φ χ ψ ω Γ Δ Θ Λ Ξ Π Σ Φ Ψ Ω ∂ ∇ ∫ ∑ ∏ √ ∞ ≈ ≠ ≤ ≥ ± × ÷ ° Å ℏ
"""


def glossary_lines(seed: int = SEED) -> list[str]:
    """Sentences mixing glossary words, so merges across common suffixes are learnt."""
    rng = random.Random(seed + 1)
    prefixes = "bio geo thermo electro hydro photo micro macro nano astro chemo neuro cardio cyto " \
        "gastro hemo immuno litho magneto paleo petro radio seismo spectro stereo tele zoo phyto".split()
    suffixes = "logy logist meter metry scope scopic graph graphy dynamics static statics sphere " \
        "lysis synthesis tropic genesis morphic kinetic chemical physics therapy genic cyte".split()
    words = GLOSSARY.split() + [p + s for p in prefixes for s in suffixes]
    return [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 10**6)}." for _ in range(4000)]


def make_rows(num_rows: int = NUM_ROWS, seed: int = SEED) -> list[dict[str, str]]:
    """Rows shaped like nvidia/OpenScience: an MCQ `input`, an R1-style `output` with <think>."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_rows:
        stem, value, unit, steps = rng.choice(PROBLEMS)(rng)
        letters = "ABCD"
        correct = rng.randrange(4)
        factors = rng.sample([0.5, 0.8, 1.25, 1.5, 2.0, 3.0, math.pi / 2], 3)
        values = [value * f for f in factors]
        values.insert(correct, value)
        options = "\n".join(f"{letters[i]}: {v:.3g} {unit}".rstrip() for i, v in enumerate(values))
        question = f"{stem}\n\n{options}"
        if question in seen:  # unique inputs, so a train/val overlap check means something
            continue
        seen.add(question)
        # Long tails on purpose: ~10% of rows run past a 512-token smoke seq_len.
        repeats = rng.choice([0] * 6 + [1, 2, 3]) if rng.random() > 0.1 else rng.randint(20, 60)
        extra = [rng.choice(FILLER).format(unit=unit or "a pure number", value=value) for _ in range(repeats)]
        reasoning = "\n".join(["Okay, let me work through this problem step by step.", *steps, *extra])
        answer = (f"Using the relation above gives {value:.3g} {unit}".rstrip()
                  + f", which is option {letters[correct]}.\n\nThe answer is ({letters[correct]}).")
        rows.append({
            "input": question,
            "output": f"<think>\n{reasoning}\n</think>\n\n{answer}",
            "license": "cc-by-4.0",
            "generator": "synthetic-template",
        })
    return rows


def write_rows(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------- tokenizer
def make_tokenizer(rows: list[dict[str, str]], out_dir: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    texts = [text for row in rows for text in (row["input"], row["output"])] + glossary_lines()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens(ADDED_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------- models
def make_model(name: str, tokenizer_dir: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = {"max_position_embeddings": 4096, **{**MODELS, **ON_DEMAND_MODELS}[name]}
    config = Qwen3Config(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),  # padded like Qwen's 151936
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        rope_theta=1_000_000.0,
        **sizes,
    )
    torch.manual_seed(SEED)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # init in bf16 (as on disk for Qwen/Qwen3-8B): half the memory
    try:
        model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures")
    parser.add_argument("--only", choices=["data", "all", "model"], default="all",
                        help="'data': only the jsonl rows (fast); 'model': only --model, from the tokenizer in --out")
    parser.add_argument("--model", choices=sorted({**MODELS, **ON_DEMAND_MODELS}), default=None,
                        help="with --only model: which model to (re)make")
    args = parser.parse_args(argv)
    if args.only == "model":
        if args.model is None:
            parser.error("--only model needs --model NAME")
        make_model(args.model, args.out / "tokenizer", args.out / "models" / args.model)
        print(f"{args.model} written to {args.out / 'models' / args.model}")
        return
    rows = make_rows()
    write_rows(rows, args.out / "openscience" / "openscience.jsonl")
    if args.only == "data":
        return
    make_tokenizer(rows, args.out / "tokenizer")
    for name in MODELS:
        make_model(name, args.out / "tokenizer", args.out / "models" / name)
    print(f"fixtures written to {args.out}")


if __name__ == "__main__":
    main()
