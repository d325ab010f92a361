"""Steering decoding: logits processors, logit_bias and per-row max_new_tokens, inside the compiled loop."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

import eqzoo
from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_batch, generate_speculative, generate_stream

NEW = 6
PROMPTS = np.array([[5, 17, 42, 7, 99], [3, 1, 0, 0, 0]], np.int32)
LENGTHS = np.array([5, 2])
VOCAB = 256  # tiny-gpt2's


@pytest.fixture(scope="module")
def greedy(gpt2):
    return np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW))


class Bias(eqx.Module):
    """A processor whose bias is an array field: traced by the loop."""

    bias: Float[Array, " vocab"]

    def __call__(self, logits, tokens, position, step):
        return logits + self.bias


def _ban(token):
    def ban(logits, tokens, position, step):
        return logits.at[token].set(-jnp.inf)

    return ban


def _generated(out, lengths=LENGTHS, limits=(NEW, NEW)):
    return [np.asarray(out)[r, n : n + k].tolist() for r, (n, k) in enumerate(zip(lengths, limits, strict=True))]


def test_a_processor_that_adds_a_bias_is_logit_bias(gpt2, greedy):
    # Token for token (greedy; sampled: the stream test below), as a Module and as logit_bias.
    tok = int(greedy[0, 5 + 1])  # row 0's second token, pushed down to change what follows
    bias = np.zeros(VOCAB, np.float32)
    bias[[tok, 9]] = [-30.0, 2.5]
    want = generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW, logit_bias={tok: -30.0, 9: 2.5})
    got = generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW, logits_processors=[Bias(jnp.asarray(bias))])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, greedy)


def test_banning_by_processor_or_logit_bias_never_produces_the_id(gpt2, greedy):
    tok = int(greedy[1, 2])  # row 1's first (and, greedy, repeated) token
    assert tok in _generated(greedy)[1]
    kw = dict(max_new_tokens=NEW, temperature=1.0, key=jax.random.key(0), repetition_penalty=1.3)
    by_bias = generate_batch(gpt2, PROMPTS, LENGTHS, logit_bias={tok: -float("inf")}, **kw)
    by_processor = generate_batch(gpt2, PROMPTS, LENGTHS, logits_processors=[_ban(tok)], **kw)
    np.testing.assert_array_equal(by_bias, by_processor)
    assert all(tok not in row for row in _generated(by_bias))


def test_greedy_forced_token_at_a_step_continues_as_the_model_would(gpt2, greedy):
    # A processor that forces token 11 at step 2: the steps before are plain greedy decoding; the
    # steps after are the greedy continuation of the prompt + the first tokens + 11 (reference: generate).
    def force(logits, tokens, position, step):
        return jnp.where(step == 2, jnp.where(jnp.arange(logits.shape[0]) == 11, 0.0, -jnp.inf), logits)

    # without the KV cache (the reference decodes with it): the processor in both loops
    out = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW, logits_processors=[force], use_cache=False))
    np.testing.assert_array_equal(out[0, :7], greedy[0, :7])
    np.testing.assert_array_equal(out[1, :4], greedy[1, :4])
    assert out[0, 5 + 2] == out[1, 2 + 2] == 11 and greedy[0, 7] != 11 and greedy[1, 4] != 11
    forced = np.zeros((2, 8), np.int32)  # each row's prompt and its first three tokens, right-padded
    forced[0], forced[1, :5] = out[0, :8], out[1, :5]
    want = np.asarray(generate_batch(gpt2, forced, LENGTHS + 3, max_new_tokens=NEW - 3))
    for r, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(out[r, : n + NEW], want[r, : n + NEW])


def test_processors_read_the_rows_tokens_at_its_position_and_logprobs_stay_the_models(gpt2):
    # No immediate repeat (reads tokens[position - 1], the prompt's last token at step 0), in
    # order after a bias: each generated token is the argmax of the full forward pass's logits with
    # the token before it banned; the log-probabilities are the unprocessed log-softmax (fp32,
    # whole model against the KV cache: 1e-4).
    def no_repeat(logits, tokens, position, step):
        return logits.at[tokens[position - 1]].set(-jnp.inf)

    kw = dict(max_new_tokens=NEW, logits_processors=[no_repeat], logit_bias={7: -jnp.inf}, return_logprobs=True)
    out, logps = generate_batch(gpt2, PROMPTS, LENGTHS, **kw)
    full = jax.jit(jax.vmap(gpt2))(out)  # (batch, total, vocab); causal: padding after a row's tokens changes nothing
    for r, n in enumerate(LENGTHS):
        seq = out[r, : n + NEW]
        logits = full[r, n - 1 : n + NEW - 1]  # (NEW, vocab): the positions before the generated tokens
        banned = logits.at[jnp.arange(NEW), seq[n - 1 : -1]].set(-jnp.inf).at[:, 7].set(-jnp.inf)
        np.testing.assert_array_equal(jnp.argmax(banned, axis=-1), seq[n:])
        want = jnp.take_along_axis(jax.nn.log_softmax(logits), seq[n:, None], axis=-1)[:, 0]
        np.testing.assert_allclose(logps[r, n : n + NEW], want, atol=1e-4)


def test_stream_gives_generate_batchs_tokens_with_processors_bias_and_row_limits(gpt2, greedy):
    bias = np.zeros(VOCAB, np.float32)
    bias[int(greedy[0, 6])] = -5.0
    kw = dict(
        max_new_tokens=[NEW, 3], temperature=0.9, key=jax.random.key(2), logits_processors=[Bias(jnp.asarray(bias))],
        logit_bias={int(greedy[1, 2]): -float("inf")},
    )
    want = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, **kw))
    chunks = list(generate_stream(gpt2, PROMPTS, LENGTHS, chunk_size=4, **kw))
    gen = np.concatenate([c.tokens for c in chunks], axis=1)
    assert _generated(want, limits=(NEW, 3)) == [gen[0].tolist(), gen[1, :3].tolist()]
    assert (gen[1, 3:] == 0).all() and (want[1, 2 + 3 :] == 0).all()
    np.testing.assert_array_equal(sum(c.counts for c in chunks), [NEW, 3])
    assert chunks[0].done.tolist() == [False, True]


def test_per_row_max_new_tokens_stops_each_row_and_compiles_for_the_largest(gpt2, greedy, compile_log):
    out = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=[NEW, 3]))
    assert out.shape == greedy.shape
    np.testing.assert_array_equal(out[0], greedy[0])
    np.testing.assert_array_equal(out[1, : 2 + 3], greedy[1, : 2 + 3])
    assert (out[1, 2 + 3 :] == 0).all()
    with compile_log() as log:
        other = np.asarray(generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=np.array([2, NEW])))
    assert log.compiled == []
    assert _generated(other, limits=(2, NEW)) == [greedy[0, 5:7].tolist(), _generated(greedy)[1]]
    assert (other[0, 7:] == 0).all()


def test_compiles_plain_functions_by_identity_and_traces_bias_and_module_arrays(gpt2, compile_log):
    ban = _ban(3)
    run = lambda **kw: generate_batch(gpt2, PROMPTS, LENGTHS, max_new_tokens=NEW, **kw)  # noqa: E731
    run(logits_processors=[ban, Bias(jnp.zeros(VOCAB))], logit_bias={1: 2.0})
    with compile_log() as log:
        run(logits_processors=[ban, Bias(jnp.ones(VOCAB))], logit_bias={4: -jnp.inf, 5: 1.0, 6: -3.0})
    assert log.compiled == []  # the same function; new Module and bias arrays, more bias entries
    with compile_log() as log:
        run(logits_processors=[lambda logits, tokens, position, step: logits, Bias(jnp.ones(VOCAB))], logit_bias={1: 2.0})
    assert any("_generate_batch_jit" in c for c in log.compiled)  # a new lambda: a new program
    # streaming: a chunk program per function too, the Module's array an argument
    list(generate_stream(gpt2, PROMPTS, LENGTHS, max_new_tokens=4, chunk_size=2, logits_processors=[Bias(jnp.zeros(VOCAB))]))
    with compile_log() as log:
        list(generate_stream(gpt2, PROMPTS, LENGTHS, max_new_tokens=4, chunk_size=2, logits_processors=[Bias(jnp.ones(VOCAB))]))
    assert log.compiled == []


def test_bad_processors_logit_bias_and_row_limits_are_refused(gpt2):
    run = lambda **kw: generate_batch(gpt2, PROMPTS, LENGTHS, **{"max_new_tokens": 2, **kw})  # noqa: E731

    def batched(logits, tokens, position, step):
        return logits[None]

    def halved(logits, tokens, position, step):
        return logits.astype(jnp.bfloat16)

    with pytest.raises(ShapeError, match=r"logits_processors\[1\] \(.*batched\) returned shape \(1, 256\).*one row"):
        run(logits_processors=[_ban(1), batched])
    with pytest.raises(ShapeError, match=r"logits_processors\[0\] \(.*halved\) returned shape \(256,\) and dtype bfloat16"):
        run(logits_processors=[halved])
    with pytest.raises(ConfigError, match=r"takes a sequence of processors.*logits_processors=\[fn\]"):
        run(logits_processors=halved)
    with pytest.raises(ConfigError, match=r"logits_processors\[0\] is not callable"):
        run(logits_processors=["ban"])
    with pytest.raises(ConfigError, match=r"logits_processors\[1\] \(BeforePenalty\(.*ban\)\) runs before the repetition "
                       r"penalty, but comes after logits_processors\[0\] \(.*ban\), which runs after it; put the BeforePenalty"):
        run(logits_processors=[_ban(1), eqzoo.generation.BeforePenalty(_ban(2))])
    with pytest.raises(ConfigError, match=r"logit_bias holds id 256, outside the model's vocabulary \[0, 256\)"):
        run(logit_bias={256: -1.0})
    with pytest.raises(ConfigError, match=r"logit_bias\[3\] is nan; a bias is a finite number or -inf"):
        run(logit_bias={3: float("nan")})
    with pytest.raises(ConfigError, match=r"logit_bias\[3\] is inf.*large bias"):
        run(logit_bias={3: float("inf")})
    with pytest.raises(ConfigError, match="logit_bias bans all 256 token ids"):
        run(logit_bias=dict.fromkeys(range(VOCAB), -float("inf")))
    with pytest.raises(ConfigError, match="logit_bias must be a mapping of token id to bias"):
        run(logit_bias=[(3, 1.0)])
    with pytest.raises(ConfigError, match="each logit_bias key"):
        run(logit_bias={"3": 1.0})
    with pytest.raises(ConfigError, match="max_new_tokens holds 3 limits for a batch of 2 prompts"):
        run(max_new_tokens=[2, 2, 2])
    with pytest.raises(ConfigError, match=r"each per-row max_new_tokens must be an integer >= 1, got \[2, 0\]"):
        run(max_new_tokens=[2, 0])
    with pytest.raises(ConfigError, match="generate decodes one prompt: max_new_tokens must be one int"):
        eqzoo.generate(gpt2, PROMPTS[0], max_new_tokens=[2])
    for kw in (dict(logits_processors=[_ban(1)]), dict(logit_bias={1: -1.0})):
        with pytest.raises(ConfigError, match=r"generate_speculative does not apply \['logit.*acceptance test"):
            generate_speculative(gpt2, gpt2, PROMPTS, LENGTHS, max_new_tokens=2, **kw)
