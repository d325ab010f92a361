"""Shared fixtures for the Hugging Face bridge tests: tiny, seeded transformers models on CPU.

Every model is created here from a fixed seed (nothing is downloaded) and saved once per test
session with transformers' own `save_pretrained`.
"""

import contextlib
import logging
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 160
MAX_SEQ = 64


def _gpt2(seed: int, **overrides):
    config = dict(
        vocab_size=VOCAB, n_positions=MAX_SEQ, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**(config | overrides))).eval()


# The decoder shape every Llama-layout family's tiny model shares (GQA, no bos/eos/pad ids).
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_SEQ,
    rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def _decoder(model_cls, config_cls, seed: int, **config):
    torch.manual_seed(seed)
    return model_cls(config_cls(**(_DECODER | config))).eval()


def _llama(seed: int, **overrides):
    return _decoder(transformers.LlamaForCausalLM, transformers.LlamaConfig, seed, **overrides)


def _mistral(seed: int, **overrides):
    return _decoder(transformers.MistralForCausalLM, transformers.MistralConfig, seed, **({"sliding_window": 8} | overrides))


def _qwen2(seed: int, **overrides):
    config = dict(rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False)
    model = _decoder(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, seed, **(config | overrides))
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


def _randomize_qk_norms(model):
    with torch.no_grad():  # transformers initialises the norms to ones: make them matter
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1.0, 0.3)
            layer.self_attn.k_norm.weight.normal_(1.0, 0.3)
    return model


def _qwen3(seed: int, **overrides):
    config = dict(rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, head_dim=32, use_sliding_window=False)
    return _randomize_qk_norms(_decoder(transformers.Qwen3ForCausalLM, transformers.Qwen3Config, seed, **(config | overrides)))


def _qwen3_moe(seed: int, **overrides):
    config = dict(
        rms_norm_eps=1e-6, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, router_aux_loss_coef=0.05,
    )
    return _randomize_qk_norms(_decoder(transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig, seed, **(config | overrides)))


def _mixtral(seed: int, **overrides):
    config = dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05)
    return _decoder(transformers.MixtralForCausalLM, transformers.MixtralConfig, seed, **(config | overrides))


def _randomize_gemma_norms(model):
    with torch.no_grad():  # transformers initialises Gemma's norm weights (scale - 1) to zero
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    return model


def _gemma(seed: int, **overrides):
    config = dict(head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return _randomize_gemma_norms(_decoder(transformers.GemmaForCausalLM, transformers.GemmaConfig, seed, **(config | overrides)))


def _gemma2(seed: int, **overrides):
    # Caps small enough to bend these tiny models' logits (Gemma 2 2B's are 50 and 30).
    config = dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, rms_norm_eps=1e-6,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0, tie_word_embeddings=True,
    )
    return _randomize_gemma_norms(_decoder(transformers.Gemma2ForCausalLM, transformers.Gemma2Config, seed, **(config | overrides)))


def _gemma3(seed: int, **overrides):
    config = dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, rms_norm_eps=1e-6, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        tie_word_embeddings=False,
    )
    return _randomize_gemma_norms(_decoder(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, seed, **(config | overrides)))


# The model families every parity test covers: GPT-2 (tied head, fused c_attn in Conv1D
# layout), Llama with grouped-query attention and an untied head, Llama with GQA, a tied
# head, an explicit head_dim that differs from hidden/heads and a non-default rope_theta, and
# Mixtral (GQA, 4 experts, top-2, untied head; per-expert tensors in HF, stacked in eqzoo), and
# Mistral (Llama's layout with an 8-position sliding window, shorter than the test sequences), and
# Qwen2 (Llama's layout with query/key/value biases, random here; tied head), Qwen3 (Llama's
# layout with per-head query/key RMSNorms, random here; tied head, head_dim 32 != 64 / 4) and
# Qwen3-MoE (Qwen3's attention, 4 experts, top-2 without renormalised weights, untied head),
# Gemma (the first generation: GeGLU, scaled embeddings, `1 + w` norms, random here; tied head),
# Gemma 2 (sandwich norms, scaled embeddings, 8-position windows on alternate layers, soft caps
# small enough to matter, query_pre_attn_scalar != head_dim; random norms, tied head) and Gemma 3
# (query/key norms, an explicit sliding/full/sliding layer_types, a local rotary base of 10k and
# a linearly scaled global one; untied head).
BUILDERS = {
    "gpt2": lambda: _gpt2(0),
    "llama-gqa-untied": lambda: _llama(1, tie_word_embeddings=False),
    "llama-gqa-tied": lambda: _llama(2, tie_word_embeddings=True, head_dim=32, rope_theta=500000.0),
    "mixtral": lambda: _mixtral(4),
    "mistral": lambda: _mistral(5),
    "qwen2": lambda: _qwen2(6),
    "qwen3": lambda: _qwen3(7),
    "qwen3-moe": lambda: _qwen3_moe(8),
    "gemma": lambda: _gemma(11),
    "gemma2": lambda: _gemma2(9),
    "gemma3": lambda: _gemma3(10),
}
FAMILIES = list(BUILDERS)


def make_gpt2(seed: int = 0, **overrides):
    """A tiny random `GPT2LMHeadModel` (eval mode)."""
    return _gpt2(seed, **overrides)


def make_llama(seed: int = 0, **overrides):
    """A tiny random `LlamaForCausalLM` (eval mode)."""
    return _llama(seed, **overrides)


def make_mistral(seed: int = 0, **overrides):
    """A tiny random `MistralForCausalLM` (eval mode)."""
    return _mistral(seed, **overrides)


def make_qwen2(seed: int = 0, **overrides):
    """A tiny random `Qwen2ForCausalLM` (eval mode, random q/k/v biases)."""
    return _qwen2(seed, **overrides)


def make_qwen3(seed: int = 0, **overrides):
    """A tiny random `Qwen3ForCausalLM` (eval mode, random query/key norms)."""
    return _qwen3(seed, **overrides)


def make_qwen3_moe(seed: int = 0, **overrides):
    """A tiny random `Qwen3MoeForCausalLM` (eval mode, random query/key norms)."""
    return _qwen3_moe(seed, **overrides)


def make_gemma(seed: int = 0, **overrides):
    """A tiny random `GemmaForCausalLM` (eval mode, random norms)."""
    return _gemma(seed, **overrides)


def make_mixtral(seed: int = 0, **overrides):
    """A tiny random `MixtralForCausalLM` (eval mode)."""
    return _mixtral(seed, **overrides)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (transformers model, folder written by its save_pretrained), built lazily."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = BUILDERS[family]()
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            cache[family] = (model, folder)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def loaded(hf_checkpoints):
    """family -> the eqzoo model loaded from that family's checkpoint, built lazily."""
    import eqzoo.hf

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = eqzoo.hf.load_pretrained(hf_checkpoints(family)[1])
        return cache[family]

    return get


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' fp32 logits for a (batch, seq) array of token ids."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def random_tokens(seed: int, shape=(2, 24), vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@contextlib.contextmanager
def transformers_messages():
    """Collect every log record transformers emits and every Python warning, as strings."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(f"{record.levelname}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        logger.removeHandler(handler)


def load_with_transformers(folder):
    """`AutoModelForCausalLM.from_pretrained(folder)`, asserting it reported nothing missing,
    unexpected or mismatched and logged no warning at all."""
    with transformers_messages() as messages:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    assert not messages, messages
    return model.eval()


@pytest.fixture(scope="session")
def hft():
    """The helpers above as one namespace (test modules cannot import conftest under
    pytest's importlib import mode)."""
    return types.SimpleNamespace(
        torch=torch, transformers=transformers, VOCAB=VOCAB, MAX_SEQ=MAX_SEQ, FAMILIES=FAMILIES, make_gpt2=make_gpt2, make_llama=make_llama,
        make_mixtral=make_mixtral, make_mistral=make_mistral, make_qwen2=make_qwen2,
        make_qwen3=make_qwen3, make_qwen3_moe=make_qwen3_moe, make_gemma=make_gemma,
        hf_logits=hf_logits, random_tokens=random_tokens, transformers_messages=transformers_messages,
        load_with_transformers=load_with_transformers,
    )
