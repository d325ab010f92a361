"""`load_tokenizer`: a local tokenizer.json read with the `tokenizers` library."""

import json
import shutil
from pathlib import Path

import jaxtyping
import numpy as np
import pytest

from eqzoo.data import AbstractTokenizer, TokenizerError, tokenizer_from_dict
from eqzoo.hf import HFFormatError, HFTokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

LINES = [line for line in Path(shutil.__file__).read_text().splitlines()[:400] if line.strip()]


def _bpe_folder(tmp_path_factory, name, special_tokens):
    """A folder with a byte-level BPE tokenizer.json trained on a few hundred lines of the
    standard library, with `special_tokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(LINES, trainer)
    folder = tmp_path_factory.mktemp(name)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer with one special token."""
    folder = _bpe_folder(tmp_path_factory, "tokenizer", ["<|endoftext|>"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|endoftext|>"}))
    return folder


def test_encode_decode_match_the_tokenizers_library(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, AbstractTokenizer) and isinstance(tok, HFTokenizer)
    reference = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "def copyfileobj(fsrc, fdst): # ünïcödé"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == reference.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.vocab_size == 300
    assert tok.eos_token_id == tok.bos_token_id == reference.token_to_id("<|endoftext|>")
    assert tok.pad_token_id is None
    assert load_tokenizer(tokenizer_dir / "tokenizer.json") == tok
    assert HFTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))) == tok  # dispatches on "hf"


def test_matches_transformers_fast_tokenizer(tokenizer_dir, hft):
    fast = hft.transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    text = "import os, sys\nshutil.copytree(src, dst)"
    assert load_tokenizer(tokenizer_dir).encode(text).tolist() == fast(text)["input_ids"]


def test_special_tokens_named_only_in_special_tokens_map_are_read(tokenizer_dir, tmp_path, hft):
    # Older folders name their special tokens in special_tokens_map.json alone; transformers reads
    # them there, so eos_token_id (what generation stops at) must not come back None.
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|endoftext|>"}))
    theirs = hft.transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert ours.eos_token_id == ours.bos_token_id == theirs.eos_token_id == theirs.bos_token_id is not None
    # Where both files name a token, transformers takes special_tokens_map.json's.
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "def", "eos_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    theirs = hft.transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert ours.pad_token_id == theirs.pad_token_id == ours.eos_token_id
    (folder / "special_tokens_map.json").write_text("[]")
    with pytest.raises(HFFormatError, match=r"special_tokens_map.json' must hold a JSON object, got list"):
        load_tokenizer(folder)


def test_errors(tokenizer_dir, tmp_path):
    with pytest.raises(HFFormatError, match=r"no tokenizer.json at .*found: \[\].*AutoTokenizer.from_pretrained\(path\).save_pretrained\(path\)"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="cannot read .* as a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(TokenizerError, match=r"token ids must lie in \[0, 300\)"):
        tok.decode(np.array([1, 300]))
    with pytest.raises(TokenizerError, match="one 1-d sequence of integer ids"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(TokenizerError, match="needs the output of HFTokenizer.to_dict"):
        HFTokenizer.from_dict({"type": "char"})


# A ChatML-style template, written for these tests; the assistant turn in {% generation %} tags
# so that transformers can report its own assistant mask to compare with.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# One that checks roles, reads a special token and a caller's switch.
STRICT = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "[{{ m['role'] | upper }}]{{ m['content'] | tojson }}{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% if terse %}(short){% endif %}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You copy files."},
    {"role": "user", "content": "def copy(src, dst):"},
    {"role": "assistant", "content": "return shutil.copyfile(src, dst)"},
    {"role": "user", "content": "and a tree? <b>ünï</b>"},
    {"role": "assistant", "content": "shutil.copytree(src, dst)"},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A BPE tokenizer with ChatML's special tokens; the template in tokenizer_config.json."""
    folder = _bpe_folder(tmp_path_factory, "chat", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _fast(folder, hft, template):
    return hft.transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), chat_template=template, eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )


@pytest.mark.parametrize("template", ["chatml", "strict"])
def test_chat_template_renders_as_transformers_does(chat_dir, hft, template, tmp_path):
    text = CHATML if template == "chatml" else STRICT
    tok = load_tokenizer(chat_dir) if template == "chatml" else HFTokenizer.from_file(chat_dir / "tokenizer.json")
    if template == "strict":  # transformers 5's own file beside the tokenizer: chat_template.jinja
        shutil.copy(chat_dir / "tokenizer.json", tmp_path / "tokenizer.json")
        shutil.copy(chat_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
        (tmp_path / "chat_template.jinja").write_text(STRICT)
        tok = load_tokenizer(tmp_path)
    fast = _fast(chat_dir, hft, text)
    chat = CHAT if template == "chatml" else CHAT[1:]
    for messages, generation in ((chat, False), (chat[:-1], True)):
        kwargs = {"terse": True} if template == "strict" else {}
        ours = tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **kwargs)
        assert ours == fast.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **kwargs)
        ids = tok.apply_chat_template(messages, add_generation_prompt=generation, **kwargs)
        assert ids.dtype == np.int32
        assert ids.tolist() == fast.apply_chat_template(messages, add_generation_prompt=generation, return_dict=False, **kwargs)
    assert HFTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).chat_template == text


def test_encode_chat_masks_the_assistant_tokens_as_transformers_does(chat_dir, hft):
    tok = load_tokenizer(chat_dir)
    tokens, mask = tok.encode_chat(CHAT)
    reference = _fast(chat_dir, hft, CHATML).apply_chat_template(
        CHAT, return_dict=True, return_assistant_tokens_mask=True
    )
    assert tokens.tolist() == reference["input_ids"]
    assert mask.astype(int).tolist() == reference["assistant_masks"]
    assert tok.decode(tokens[mask], skip_special_tokens=False) == (
        "return shutil.copyfile(src, dst)<|im_end|>shutil.copytree(src, dst)<|im_end|>"
    )
    # Without generation tags: each turn after its generation prompt, the newline included.
    untagged = HFTokenizer(tok.tokenizer, chat_template=CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    plain_tokens, plain_mask = untagged.encode_chat(CHAT)
    assert plain_tokens.tolist() == tokens.tolist()
    assert tok.decode(plain_tokens[plain_mask], skip_special_tokens=False) == (
        "return shutil.copyfile(src, dst)<|im_end|>\nshutil.copytree(src, dst)<|im_end|>\n"
    )
    # Packed for fine-tuning: only the assistant's tokens are targets.
    from eqzoo.data import pack_documents

    second = tok.encode_chat(CHAT[:3])
    packed = pack_documents([tokens, second[0]], 256, target_masks=[mask, second[1]])
    assert packed["mask"].sum() == mask[1:].sum() + second[1][1:].sum()


def test_chat_template_errors(chat_dir, tokenizer_dir):
    with pytest.raises(TokenizerError, match=r"has no chat template .*chat_template="):
        load_tokenizer(tokenizer_dir).apply_chat_template(CHAT)
    tok = load_tokenizer(chat_dir)
    with pytest.raises(TokenizerError, match=r"a conversation is a list of messages"):
        tok.apply_chat_template("hello")
    with pytest.raises(TokenizerError, match=r"message 1 of the conversation must be a dict with a string 'role'"):
        tok.apply_chat_template([CHAT[0], {"content": "no role"}])
    strict = HFTokenizer(tok.tokenizer, chat_template=STRICT)
    with pytest.raises(TokenizerError, match=r"refused the conversation: roles must alternate user/assistant"):
        strict.apply_chat_template(CHAT)  # starts with a system turn
    with pytest.raises(TokenizerError, match=r"does not parse \(line 1\)"):
        HFTokenizer(tok.tokenizer, chat_template="{% for m in messages %}").apply_chat_template(CHAT)
    # The sandbox: a template cannot reach Python internals.
    with pytest.raises(TokenizerError, match=r"failed while rendering"):
        HFTokenizer(tok.tokenizer, chat_template="{{ messages.__class__.__mro__ }}").apply_chat_template(CHAT)
    # A template that rewrites earlier turns once later ones exist has no assistant spans ...
    forgetful = "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(TokenizerError, match=r"cannot tell which tokens are assistant message 2's"):
        HFTokenizer(tok.tokenizer, chat_template=forgetful).encode_chat(CHAT)
    # ... but its last reply, alone, is well defined.
    tokens, mask = HFTokenizer(tok.tokenizer, chat_template=forgetful).encode_chat(CHAT[:3])
    assert tok.decode(tokens[mask]).strip() == "return shutil.copyfile(src, dst)"


def test_chat_templates_see_plain_data_only(chat_dir, tmp_path):
    tok = load_tokenizer(chat_dir)
    target = tmp_path / "written"
    parts = [{"role": "user", "content": np.arange(3)}]
    with pytest.raises(TokenizerError, match=r"failed while rendering"):  # a list now: no .dump
        HFTokenizer(tok.tokenizer, chat_template="{{ messages[0].content.dump('" + str(target) + "') }}").apply_chat_template(parts)
    assert not target.exists()
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    evil = "{{ dict.update(messages[0]['content'][0], {'text': 'evil'}) }}"
    with pytest.raises(TokenizerError, match=r"'function object' has no attribute 'update'"):
        HFTokenizer(tok.tokenizer, chat_template=evil).apply_chat_template(messages)
    assert HFTokenizer(tok.tokenizer, chat_template="{{ dict(a=1) | tojson }}").apply_chat_template(messages, tokenize=False) == '{"a": 1}'
    assert messages[0]["content"][0]["text"] == "hi"  # the caller's data is never the template's
    for template in ("{% set ns = namespace(_x=1) %}", "{% set ns = namespace(a=1) %}{% set ns._y = 2 %}"):
        with pytest.raises(TokenizerError, match=r"may not store '_[xy]' on a namespace"):
            HFTokenizer(tok.tokenizer, chat_template=template).apply_chat_template(messages)
    with pytest.raises(TokenizerError, match=r"message 0\['tools_fn'\] is a builtin_function_or_method.*JSON schemas"):
        tok.apply_chat_template([{"role": "user", "content": "x", "tools_fn": print}])
    with pytest.raises(TokenizerError, match=r"the conversation is empty"):
        tok.apply_chat_template([])
    # The jaxtyping hook of the test suite rejects these annotations first; without it, our checks do.
    with pytest.raises((TokenizerError, jaxtyping.TypeCheckError), match=r"chat_template"):
        HFTokenizer(tok.tokenizer, chat_template=3)
    with pytest.raises((TokenizerError, jaxtyping.TypeCheckError), match=r"chat_template"):
        HFTokenizer(tok.tokenizer, chat_template={"default": 3})
    with pytest.raises(TokenizerError, match=r"add_generation_prompt starts a new assistant turn .* ask for one of them"):
        tok.apply_chat_template(CHAT, add_generation_prompt=True, continue_final_message=True)


def test_chat_template_inputs_as_transformers_passes_them(chat_dir, hft):
    # None-valued keys dropped, tools/documents None when not given, the special-token strings,
    # named templates ("tool_use" when tools are given) and continue_final_message.
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content if m.content is defined else '(no content)' }}{% endfor %}"
        "{% if tools is not none %}TOOLS{{ tools | tojson }}{% endif %}|{{ eos_token }}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}]
    tok = HFTokenizer(load_tokenizer(chat_dir).tokenizer, {"eos_token": "<|im_end|>"}, chat_template=template)
    fast = _fast(chat_dir, hft, template)
    assert tok.apply_chat_template(messages, tokenize=False) == fast.apply_chat_template(messages, tokenize=False)
    named = {"default": "{% for m in messages %}{{ m.content }}{% endfor %}", "tool_use": "TOOLS:{{ tools | length }}"}
    both = HFTokenizer(tok.tokenizer, chat_template=named)
    tools = [{"type": "function", "function": {"name": "copy", "parameters": {}}}]
    assert both.apply_chat_template(messages[:1], tokenize=False) == "hi"
    assert both.apply_chat_template(messages[:1], tools=tools, tokenize=False) == "TOOLS:1"
    with pytest.raises(TokenizerError, match=r"chat templates are \['tool_use'\], none named 'default'"):
        HFTokenizer(tok.tokenizer, chat_template={"tool_use": "x"}).apply_chat_template(messages)
    chatml = load_tokenizer(chat_dir)
    prefill = CHAT[:2] + [{"role": "assistant", "content": "return shutil"}]
    ours = chatml.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert ours == _fast(chat_dir, hft, CHATML).apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert ours.endswith("assistant\nreturn shutil")
    with pytest.raises(TokenizerError, match=r"encode_chat renders whole conversations .* add_generation_prompt"):
        chatml.encode_chat(CHAT, add_generation_prompt=True)


TEXTS = ["import os", "def copyfileobj(fsrc, fdst, length=0):", "x", "shutil.copytree(src, dst) ünï <|endoftext|>"]


@pytest.fixture(scope="module")
def pad_dir(tmp_path_factory):
    """A BPE tokenizer that adds a BOS (as Llama's does) and names a pad token."""
    from tokenizers import processors

    folder = _bpe_folder(tmp_path_factory, "pad", ["<|endoftext|>", "<pad>", "<s>"])
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "bos_token": "<s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# encode_batch's arguments, and the same request to transformers' tokenizer(...).
BATCH_SETTINGS = [
    ({}, {"padding": True}),
    ({"padding_side": "left"}, {"padding": True, "padding_side": "left"}),
    ({"truncation": True, "max_length": 5, "padding_side": "left"}, {"padding": True, "truncation": True, "max_length": 5, "padding_side": "left"}),
    ({"padding": "max_length", "max_length": 30}, {"padding": "max_length", "max_length": 30}),
    ({"padding": "max_length", "max_length": 29, "pad_to_multiple_of": 4, "padding_side": "left"},
     {"padding": "max_length", "max_length": 29, "pad_to_multiple_of": 4, "padding_side": "left"}),
    ({"pad_to_multiple_of": 8, "add_special_tokens": False}, {"padding": True, "pad_to_multiple_of": 8, "add_special_tokens": False}),
    ({"padding": "max_length", "max_length": 12, "truncation": True, "pad_to_multiple_of": 4},
     {"padding": "max_length", "max_length": 12, "truncation": True, "pad_to_multiple_of": 4}),
]


def test_encode_batch_matches_transformers(pad_dir, hft):
    ours = load_tokenizer(pad_dir)
    theirs = hft.transformers.AutoTokenizer.from_pretrained(pad_dir)
    assert ours.pad_token_id == theirs.pad_token_id is not None and ours.padding_side == theirs.padding_side == "right"
    for kwargs, reference in BATCH_SETTINGS:
        batch = ours.encode_batch(TEXTS, **kwargs)
        want = theirs(TEXTS, return_tensors="np", **reference)
        assert batch.ids.dtype == batch.attention_mask.dtype == np.int32, kwargs
        np.testing.assert_array_equal(batch.ids, want["input_ids"], err_msg=str(kwargs))  # exact
        np.testing.assert_array_equal(batch.attention_mask, want["attention_mask"], err_msg=str(kwargs))
        assert batch.padding_side == kwargs.get("padding_side", "right")
    # Each row is the text's own encoding; the tokenizer's settings are left as they were.
    batch = ours.encode_batch(TEXTS, padding_side="left", pad_to_multiple_of=8)
    for row, mask, text in zip(batch.ids, batch.attention_mask, TEXTS, strict=True):
        assert row[mask == 1].tolist() == ours.encode(text).tolist()
    assert ours.tokenizer.padding is None and ours.tokenizer.truncation is None


def test_tokenizer_flags_take_numpy_bools(pad_dir, unchecked):
    tok = load_tokenizer(pad_dir)
    want = tok.encode_batch(TEXTS, truncation=True, max_length=5, add_special_tokens=False)
    got = tok.encode_batch(TEXTS, truncation=np.True_, max_length=5, add_special_tokens=np.False_)
    np.testing.assert_array_equal(got.ids, want.ids)
    with unchecked():
        assert tok.encode(TEXTS[0], add_special_tokens=np.False_).tolist() == tok.encode(TEXTS[0], add_special_tokens=False).tolist()
        with pytest.raises(TokenizerError, match="add_special_tokens must be True or False"):
            tok.encode(TEXTS[0], add_special_tokens="no")
    with pytest.raises(TokenizerError, match="truncation must be True or False"):
        tok.encode_batch(TEXTS, truncation=1, max_length=5)


def test_encode_batch_follows_the_tokenizer_it_holds(pad_dir):
    # encode_batch runs on configured copies of `tokenizer`, kept per setting: a copy made before
    # the tokenizer gained a token, or before `tokenizer` was replaced, went on encoding with the
    # old vocabulary (batch rows unlike the texts' single encodes), and a truncation the
    # tokenizer carried cut the texts of a truncation=False batch.
    tok = load_tokenizer(pad_dir)
    text = "x = 1 <|im_start|>"
    tok.encode_batch([text])  # makes and keeps the copy for this setting
    tok.tokenizer.add_special_tokens(["<|im_start|>"])
    assert tok.encode_batch([text]).ids[0].tolist() == tok.encode(text).tolist()
    assert tok.tokenizer.token_to_id("<|im_start|>") in tok.encode(text).tolist()
    tok.tokenizer = tokenizers.Tokenizer.from_file(str(pad_dir / "tokenizer.json"))  # without it again
    assert tok.encode_batch([text]).ids[0].tolist() == tok.encode(text).tolist()
    raw = tokenizers.Tokenizer.from_file(str(pad_dir / "tokenizer.json"))
    raw.enable_truncation(max_length=3)  # as a tokenizer.json may carry it
    batch = HFTokenizer(raw, {"pad_token": "<pad>"}).encode_batch(TEXTS)
    assert batch.attention_mask.sum(1).tolist() == [len(tok.encode(t)) for t in TEXTS]
    assert max(len(tok.encode(t)) for t in TEXTS) > 3


def test_copies_and_pickles_despite_the_encode_batch_lock(pad_dir):
    # The lock that guards encode_batch's configured copies cannot be copied: without
    # __getstate__, copy.deepcopy and pickle (multiprocessing workers) raised "cannot pickle
    # '_thread.lock' object". A deep copy has its own tokenizer and copies; a shallow one shares both.
    import copy
    import pickle

    tok = load_tokenizer(pad_dir)
    want = tok.encode_batch(TEXTS, padding_side="left")
    shallow, deep = copy.copy(tok), copy.deepcopy(tok)
    assert shallow.tokenizer is tok.tokenizer and shallow._batch_encoder is tok._batch_encoder
    assert deep.tokenizer is not tok.tokenizer and deep._batch_encoder is not tok._batch_encoder
    for clone in (shallow, deep):
        assert clone == tok
        batch = clone.encode_batch(TEXTS, padding_side="left")
        np.testing.assert_array_equal(batch.ids, want.ids)
        np.testing.assert_array_equal(batch.attention_mask, want.attention_mask)
        assert clone.tokenizer.padding is None and clone.encode(TEXTS[0]).tolist() == tok.encode(TEXTS[0]).tolist()
    assert pickle.dumps(tok)  # written only: eqzoo never loads pickle


def test_truncation_side_matches_transformers(pad_dir, tmp_path, hft):
    # truncation_side "left" keeps each text's end, from the call or tokenizer_config.json, as
    # transformers' truncation_side does (exact ids and mask; special tokens kept, as there).
    shutil.copy(pad_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((pad_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"truncation_side": "left"}))
    right, left = load_tokenizer(pad_dir), load_tokenizer(tmp_path)
    theirs = {side: hft.transformers.AutoTokenizer.from_pretrained(tmp_path if side == "left" else pad_dir) for side in ("right", "left")}
    assert (right.truncation_side, left.truncation_side) == (theirs["right"].truncation_side, theirs["left"].truncation_side) == ("right", "left")
    for kwargs in ({"max_length": 5}, {"max_length": 6, "padding": "max_length", "padding_side": "left"}):
        for side in ("right", "left"):
            want = theirs[side](TEXTS, truncation=True, return_tensors="np", **{"padding": True} | kwargs)
            default, other = (left, right) if side == "left" else (right, left)
            for ours, override in ((default, None), (other, side)):  # the file's side, or the call's
                batch = ours.encode_batch(TEXTS, truncation=True, truncation_side=override, **kwargs)
                np.testing.assert_array_equal(batch.ids, want["input_ids"], err_msg=f"{side} {kwargs}")  # exact
                np.testing.assert_array_equal(batch.attention_mask, want["attention_mask"], err_msg=f"{side} {kwargs}")
    cut = left.encode_batch(TEXTS, truncation=True, max_length=5).ids[1]
    assert cut[0] == left.bos_token_id and cut[1:].tolist() == left.encode(TEXTS[1], add_special_tokens=False)[-4:].tolist()
    assert HFTokenizer.from_dict(json.loads(json.dumps(left.to_dict()))).truncation_side == "left"
    # tokenizer.json's own truncation direction is the default under tokenizer_config.json's, as in transformers.
    tok = tokenizers.Tokenizer.from_file(str(pad_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=7, direction="left")
    (tmp_path / "json").mkdir()
    tok.save(str(tmp_path / "json" / "tokenizer.json"))
    (tmp_path / "json" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path / "json").truncation_side == hft.transformers.AutoTokenizer.from_pretrained(tmp_path / "json").truncation_side == "left"
    with pytest.raises(TokenizerError, match=r"encode_batch: truncation_side must be 'right' or 'left'; got 'middle'"):
        right.encode_batch(TEXTS, truncation=True, max_length=5, truncation_side="middle")
    with pytest.raises(TokenizerError, match=r"HFTokenizer: truncation_side must be 'right' or 'left'; got 'up'"):
        HFTokenizer(right.tokenizer, truncation_side="up")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"truncation_side": "both"}))
    with pytest.raises(HFFormatError, match=r"tokenizer_config\.json'.*truncation_side must be 'right' or 'left'; got 'both'"):
        load_tokenizer(tmp_path)


def test_threads_mixing_single_and_batch_encodes_get_their_own_results(pad_dir):
    # encode_batch pads and truncates copies of the tokenizer, so single encodes take no lock and
    # never see a batch's settings: 0 wrong results from threads interleaving both (the shared
    # tokenizer switched padding on per batch call, and single encodes waited on a lock for it).
    import threading

    tok = load_tokenizer(pad_dir)
    singles = {t: tok.encode(t).tolist() for t in TEXTS}
    settings = [{"padding_side": "left"}, {"truncation": True, "max_length": 5}, {"padding": "max_length", "max_length": 32}]
    batches = [tok.encode_batch(TEXTS, **s) for s in settings]
    wrong, barrier = [], threading.Barrier(6)

    def work(i):
        barrier.wait()
        for j in range(60):
            if (i + j) % 3:
                text = TEXTS[(i + j) % len(TEXTS)]
                if tok.encode(text).tolist() != singles[text]:
                    wrong.append((i, j))
            else:
                k = (i + j) % len(settings)
                if not np.array_equal(tok.encode_batch(TEXTS, **settings[k]).ids, batches[k].ids):
                    wrong.append((i, j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert tok.tokenizer.padding is None and tok.tokenizer.truncation is None  # never reconfigured


def test_decode_batch_and_the_skip_special_tokens_default(pad_dir, hft):
    ours = load_tokenizer(pad_dir)
    theirs = hft.transformers.AutoTokenizer.from_pretrained(pad_dir)
    for side in ("left", "right"):
        batch = ours.encode_batch(TEXTS, padding_side=side)
        # With the mask: the texts, whichever side was padded (BOS and the literal <|endoftext|> kept).
        assert ours.decode_batch(batch.ids, batch.attention_mask) == ["<s>" + t for t in TEXTS]
        # Without it, as transformers' batch_decode: special tokens kept by default, or all dropped.
        assert ours.decode_batch(batch.ids) == theirs.batch_decode(batch.ids)
        assert ours.decode_batch(batch.ids, skip_special_tokens=True) == theirs.batch_decode(batch.ids, skip_special_tokens=True)
    # decode keeps special tokens by default too, as transformers' decode does: text holding them round-trips.
    ids = ours.encode(TEXTS[3], add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids.tolist()) == TEXTS[3]
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids.tolist(), skip_special_tokens=True)


def test_padding_defaults_come_from_the_tokenizer_files(pad_dir, tmp_path, hft):
    # tokenizer_config.json's padding_side; a pad token and side from tokenizer.json's own padding.
    tok = tokenizers.Tokenizer.from_file(str(pad_dir / "tokenizer.json"))
    tok.enable_padding(direction="left", pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours, theirs = load_tokenizer(tmp_path), hft.transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token_id == theirs.pad_token_id == tok.token_to_id("<pad>")
    assert ours.padding_side == theirs.padding_side == "left"
    np.testing.assert_array_equal(ours.encode_batch(TEXTS).ids, theirs(TEXTS, padding=True, return_tensors="np")["input_ids"])
    # encode, as transformers' single call, does not pad.
    assert ours.encode("x").tolist() == theirs("x")["input_ids"]
    config = {"pad_token": "<pad>", "padding_side": "left", "tokenizer_class": "PreTrainedTokenizerFast"}
    (pad_dir.parent / "cfg").mkdir(exist_ok=True)
    shutil.copy(pad_dir / "tokenizer.json", pad_dir.parent / "cfg" / "tokenizer.json")
    (pad_dir.parent / "cfg" / "tokenizer_config.json").write_text(json.dumps(config))
    left = load_tokenizer(pad_dir.parent / "cfg")
    assert left.padding_side == "left" and left.encode_batch(TEXTS).attention_mask[2, 0] == 0
    assert HFTokenizer.from_dict(json.loads(json.dumps(left.to_dict()))).padding_side == "left"
    # A file that pads to a fixed length and truncates: a single encode does neither (as in
    # transformers, which switches both off for a call that does not ask for them).
    tok = tokenizers.Tokenizer.from_file(str(pad_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>", length=64)
    tok.enable_truncation(max_length=3)
    (tmp_path / "fixed").mkdir()
    tok.save(str(tmp_path / "fixed" / "tokenizer.json"))
    ours, theirs = load_tokenizer(tmp_path / "fixed"), hft.transformers.AutoTokenizer.from_pretrained(tmp_path / "fixed")
    assert ours.encode(TEXTS[1]).tolist() == theirs(TEXTS[1])["input_ids"]
    assert len(ours.encode(TEXTS[1])) > 3 and ours.encode_batch(TEXTS).ids.shape[1] == max(len(ours.encode(t)) for t in TEXTS)


def test_encode_batch_errors(tokenizer_dir, pad_dir):
    plain = load_tokenizer(tokenizer_dir)  # GPT-2-like: no pad token
    with pytest.raises(TokenizerError, match=r"no pad token, and eqzoo never pads with 0 or eos silently\. Pass pad_token_id=.*eos_token_id"):
        plain.encode_batch(TEXTS)
    batch = plain.encode_batch(TEXTS, pad_token_id=plain.eos_token_id)
    assert (batch.ids[batch.attention_mask == 0] == plain.eos_token_id).all()
    tok = load_tokenizer(pad_dir)
    with pytest.raises(TokenizerError, match=r"padding='max_length' needs max_length"):
        tok.encode_batch(TEXTS, padding="max_length")
    with pytest.raises(TokenizerError, match=r"text 1 has 28 tokens, more than max_length=8 \(texts \[1, 3\] are too long\); pass truncation=True"):
        tok.encode_batch(TEXTS, padding="max_length", max_length=8)
    with pytest.raises(TokenizerError, match=r"item 1 is a bytes"):
        tok.encode_batch(["a", b"b"])
    with pytest.raises(TokenizerError, match=r"padding_side must be 'right' or 'left' .*got 'top'"):
        tok.encode_batch(TEXTS, padding_side="top")
    with pytest.raises(TokenizerError, match=r"token ids must lie in \[0, 300\)"):
        tok.decode_batch(np.array([[1, 300]]))


def test_left_padded_batch_generates_as_each_prompt_alone(pad_dir):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqzoo
    from eqzoo.generation import generate_batch

    tok = load_tokenizer(pad_dir)
    def init(key):  # one compiled program rather than an eager op per parameter
        model = eqzoo.models.create("tiny-llama", key=key, max_seq=32, vocab_size=tok.vocab_size, num_layers=1)
        # init_std is 0.02: scale the weights up so greedy decoding does not just repeat one token.
        return jax.tree.map(lambda a: 8 * a if eqx.is_inexact_array(a) else a, model)

    model = eqx.filter_jit(init)(jax.random.key(0))
    prompts = ["import os", "def copy(src):", "x"]
    batch = tok.encode_batch(prompts, padding_side="left")
    assert batch.attention_mask[2, 0] == 0  # padded on the left
    new = 4
    out = np.asarray(generate_batch(model, batch.ids, attention_mask=batch.attention_mask, max_new_tokens=new, pad_token=tok.pad_token_id))
    # Each row is its prompt alone, unpadded, then its greedy continuation: the argmax of the
    # model run on that row alone (right padding after it is never attended to; one compile).
    logits = eqx.filter_jit(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, jnp.asarray(out))
    for row, row_logits, prompt, n in zip(out, np.asarray(logits), prompts, batch.lengths, strict=True):
        assert row[:n].tolist() == tok.encode(prompt).tolist()
        np.testing.assert_array_equal(row[n : n + new], row_logits[n - 1 : n + new - 1].argmax(-1))  # greedy: exact
        assert (row[n + new :] == tok.pad_token_id).all()
    assert len(set(out[:, -new:].ravel().tolist())) > 1  # not a degenerate repeat


def test_chat_batch_matches_transformers(chat_dir, hft):
    tok = load_tokenizer(chat_dir)
    ours = HFTokenizer(tok.tokenizer, {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, chat_template=CHATML)
    theirs = hft.transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(chat_dir / "tokenizer.json"), chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    conversations = [CHAT[:2], CHAT[1:4], [{"role": "user", "content": "hi"}]]
    batch = ours.apply_chat_template_batch(conversations, add_generation_prompt=True, padding_side="left")
    want = theirs.apply_chat_template(
        conversations, add_generation_prompt=True, padding=True, tokenizer_kwargs={"padding_side": "left"},
        return_dict=True, return_tensors="np",
    )
    np.testing.assert_array_equal(batch.ids, want["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, want["attention_mask"])
    for row, mask, conversation in zip(batch.ids, batch.attention_mask, conversations, strict=True):
        assert row[mask == 1].tolist() == ours.apply_chat_template(conversation, add_generation_prompt=True).tolist()
    # The padding and truncation arguments go to encode_batch, with its defaults and checks; truncation_side too.
    cut = ours.apply_chat_template_batch(conversations, add_generation_prompt=True, truncation=True, max_length=6, truncation_side="left")
    np.testing.assert_array_equal(cut.ids, ours.encode_batch(
        [ours.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations],
        truncation=True, max_length=6, truncation_side="left", add_special_tokens=False).ids)
    with pytest.raises(TokenizerError, match=r"HFTokenizer\.encode_batch: padding_side must be 'right' or 'left' .*got 'top'"):
        ours.apply_chat_template_batch(conversations, padding_side="top")
    with pytest.raises(TokenizerError, match=r"got a list of messages: one conversation\. Wrap it, \[messages\]"):
        ours.apply_chat_template_batch(CHAT)
    with pytest.raises(TokenizerError, match=r"no pad token"):
        tok.apply_chat_template_batch(conversations)


STREAM_TEXTS = ["naïve café — 東京タワー 🎉👩‍💻 中文字符 ünïcödé,  two  spaces", "def f(x):\n    return x  # ∑ 🙂"]


def _stream_tokenizer(kind):
    """A tokenizer trained here on a few hundred standard-library lines, with the special token
    `</s>`: byte-level BPE (GPT-2, Llama 3); a Metaspace "▁" BPE; or Llama 2's layout ("▁" for
    spaces, byte-fallback tokens `<0xNN>` for characters the vocabulary lacks, a leading space
    stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(STREAM_TEXTS)))  # every character of the texts is a token
    else:  # llama-2 style
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "</s>"], show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator(LINES, trainer)
    if kind == "llama-2":  # the same vocabulary, with a token for each byte for what it lacks
        model = json.loads(tok.to_str())["model"]
        vocab = dict(model["vocab"])
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        special = tok.get_added_tokens_decoder()
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
        tok.add_special_tokens([t for _, t in sorted(special.items())])
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return HFTokenizer(tok, {"eos_token": "</s>"})


@pytest.mark.parametrize("kind", ["byte-level", "metaspace", "llama-2"])
def test_stream_decoder_joins_to_decode_for_any_split(kind):
    tok = _stream_tokenizer(kind)
    eos = tok.eos_token_id
    ids = np.concatenate([tok.encode(STREAM_TEXTS[0]), [eos], tok.encode(STREAM_TEXTS[1]), tok.encode(STREAM_TEXTS[0])[:9]])
    assert tok.decode(tok.encode(STREAM_TEXTS[0])) == STREAM_TEXTS[0]  # the texts are the tokenizer's to write
    if kind != "metaspace":  # the characters the vocabulary lacks are split into bytes
        assert len(tok.encode("東京🎉")) > 3
    rng = np.random.default_rng(0)
    for skip in (False, True):
        want = tok.decode(ids, skip_special_tokens=skip)
        assert ("</s>" in want) is not skip
        for _ in range(25):
            pieces = np.split(ids, np.sort(rng.integers(0, len(ids) + 1, rng.integers(1, len(ids) // 2))))
            decoder = tok.stream_decoder(skip_special_tokens=skip)
            got = "".join(decoder.push(p) for p in pieces) + decoder.flush()
            assert got == want, [len(p) for p in pieces]
    # decoded alone, the chunks give other text: the failure the decoder avoids
    pieces = np.array_split(ids, 12)
    assert "".join(tok.decode(p) for p in pieces) != tok.decode(ids)


def _gpt2_byte_ids(tok, data: bytes) -> list[int]:
    """The ids of a byte-level BPE's single-byte tokens for `data` (GPT-2's byte-to-character
    table: printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    char = {b: chr(b) if b in printable else chr(next(others)) for b in range(256)}
    return [tok.tokenizer.token_to_id(char[b]) for b in data]


def test_stream_decoder_writes_a_long_invalid_run_as_it_comes():
    # 2,000 lone continuation bytes (an untrained model's ids) between text: joined, the pushes
    # are decode's text; each push decodes a bounded number of ids (the base code decoded the
    # whole held run again on every push: ~2,000 ids a push by the end).
    from eqzoo.data import StreamDecoder

    tok = _stream_tokenizer("byte-level")
    run = _gpt2_byte_ids(tok, bytes(range(0x80, 0xC0)) * 32)[:2000]
    ids = np.concatenate([tok.encode("def f(x):"), run, tok.encode("東京 🎉"), run[:7], _gpt2_byte_ids(tok, "🎉".encode()[:3])])
    want = tok.decode(ids)
    assert want.count("\ufffd") == 2008  # each lone byte one U+FFFD, and the cut emoji one
    decoded = []
    decoder = StreamDecoder(lambda i: decoded.append(len(i)) or tok.decode(i), tok.vocab_size)
    per_push, texts = [], []
    for piece in np.array_split(ids, len(ids) // 3):
        decoded.clear()
        texts.append(decoder.push(piece))
        per_push.append(sum(decoded))
    assert "".join(texts) + decoder.flush() == want
    assert max(per_push) <= 96, max(per_push)
    rng = np.random.default_rng(0)
    for _ in range(3):
        decoder = tok.stream_decoder()
        pieces = np.split(ids, np.sort(rng.integers(0, len(ids), 300)))
        assert "".join(decoder.push(p) for p in pieces) + decoder.flush() == want, [len(p) for p in pieces]


def _wordpiece_folder(tmp_path_factory):
    """A BERT-style WordPiece tokenizer.json ("##" continuations, lowercasing, punctuation split)
    trained on a few hundred lines of the standard library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False)
    tok.train_from_iterator(LINES, trainer)
    folder = tmp_path_factory.mktemp("wordpiece")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_stream_decoder_joins_to_decode_for_wordpiece(tmp_path_factory):
    # WordPiece decode puts a space before each token but a "##" piece (joined to the one
    # before), and its cleanup drops the space before some punctuation and contractions
    # (" ," -> ",", " n't" -> "n't"); each rule looks at one token and the space before it, not
    # across tokens, so a token's text never changes the text written before it, and any split
    # joins to decode's text. Checked here with a BERT-style tokenizer loaded by load_tokenizer.
    tok = load_tokenizer(_wordpiece_folder(tmp_path_factory))
    text = "Don't copy, shutil.copyfileobj(fsrc, fdst)! It's done... isn't it? We've 're 'm 'd co-op [x] 東京"
    ids = np.concatenate([tok.encode(f"{text} {LINES[5]}"), [tok.tokenizer.token_to_id("[UNK]")], tok.encode("unzip xyzzyq")])
    want = tok.decode(ids)
    # "##" pieces joined, no space before "," or "!"; the pre-tokenizer splits "'" off, so "don ' t"
    assert want.startswith("don ' t copy, shutil. copyfileobj ( fsrc, fdst )! it ' s done...") and "##" not in want
    assert sum(tok.tokenizer.id_to_token(int(i)).startswith("##") for i in ids) > 10  # words in pieces
    rng = np.random.default_rng(0)
    for skip in (False, True):
        want = tok.decode(ids, skip_special_tokens=skip)
        for _ in range(25):
            pieces = np.split(ids, np.sort(rng.integers(0, len(ids) + 1, rng.integers(1, len(ids) // 2))))
            decoder = tok.stream_decoder(skip_special_tokens=skip)
            got = "".join(decoder.push(p) for p in pieces) + decoder.flush()
            assert got == want, [len(p) for p in pieces]


def test_stream_decoder_refuses_ids_outside_the_vocabulary():
    tok = _stream_tokenizer("byte-level")
    with pytest.raises(TokenizerError, match=rf"HFTokenizer stream decoder: ids must lie in \[0, {tok.vocab_size}\); got id -1"):
        tok.stream_decoder().push([1, -1])
