"""Greedy token-for-token equality with Hugging Face transformers on the same checkpoint.

Every test runs the engine at temperature 0 and compares each request's ``token_ids`` with
``tiny_models.hf_greedy`` (HF ``generate``, one prompt at a time, no padding), which keeps a
final eos when HF stopped on one: our output must be exactly that list. The scenarios cover the
paths where a paged engine can diverge from a plain forward pass: batches of very different
lengths, prefix-cache hits, chunked prefill, preemption by recompute, several eos ids, chat
templates, and returning every KV block afterwards.

Llama and Qwen2 also run at the large weight scale (``*_large``: HF's init at std 0.2, see
``weight_scale``) for single prompts, batches, prefix hits, chunked prefill and preemption.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch

from engine import LLM, SamplingParams

MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
LARGE = ["tiny_llama_large", "tiny_qwen2_large"]  # conftest: HF's init at weight_scale.LARGE_STD
MODELS = ["tiny_llama", "tiny_llama_gqa", "tiny_qwen2", "tiny_qwen2_sharded", *LARGE]

TEXTS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "My phone number is 555-0123, call me after 6 pm.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.718",
    "She sells sea shells by the sea shore.",
    "What is the meaning of life, the universe, and everything? It is 42.",
    "Please write a short poem about the sea and the sky.",
    "Water boils at 100 degrees Celsius and freezes at 0 degrees.",
    "In 1969, two astronauts walked on the Moon for the first time.",
    "A cat sat on the mat; a dog slept by the door.",
    "Can you tell me a story about a dragon and a knight?",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
    "List three fruits: apple, banana, cherry.",
    "The meeting was moved to Tuesday, March 3rd, at 10:30.",
    "Good morning! Good evening! Good night!",
    "Yes. No. Maybe. Sometimes. Always. Never.",
]

# A long text to cut token-id prompts of chosen lengths from.
LONG_TEXT = " ".join(
    [
        "Once upon a time, there was a little girl who lived in a village near the forest.",
        "The capital of France is Paris, and the capital of Japan is Tokyo.",
        "Machine learning models learn patterns from large amounts of data.",
        "The engine serves many requests at once using continuous batching.",
        "The weather today is sunny with a high of 25 degrees.",
        "He said: \"Don't forget to bring your umbrella!\"",
        "The user asked a question and the assistant gave a helpful answer.",
        "You are a helpful assistant. Answer briefly and clearly.",
        "Translate this sentence into French: I like apples.",
        "The train leaves the station at 8:45 every morning.",
        "Green trees, blue rivers, and tall mountains fill the valley.",
        "def add(a, b):\n    return a + b",
        "for i in range(10):\n    print(i * i)",
        "Reading books every day makes you smarter and calmer.",
        "Tokens are pieces of words that a model reads and writes.",
        "The price went from $19.99 to $24.50 in two years.",
        "An image of a red car parked next to a white house.",
        "Describe the picture: two people walking on a beach at sunset.",
        "She opened the window and the cold wind came in.",
        "Email: someone@example.com, website: https://example.com/path?q=1",
        "Large language models generate text one token at a time.",
    ]
    + TEXTS
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: on a shared 2-core machine intra-op threads only add spin-waiting
    (10-50x slower under load). Restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(model_dir, **kwargs) -> LLM:
    args = {"dtype": "float32", "device": "cpu", "seed": 0, "max_model_len": 256, "block_size": 16,
            "enable_prefix_caching": True}
    args.update(kwargs)
    return LLM(str(model_dir), **args)


_HF_MEMO: dict[tuple, list[int]] = {}


def hf_ref(model_dir, prompts_ids: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    """hf_greedy, memoised per (model, prompt, max_new) so scenarios can share references."""
    missing = [p for p in prompts_ids if (str(model_dir), tuple(p), max_new) not in _HF_MEMO]
    if missing:
        for p, out in zip(missing, tiny_models.hf_greedy(model_dir, missing, max_new)):
            _HF_MEMO[(str(model_dir), tuple(p), max_new)] = out
    return [_HF_MEMO[(str(model_dir), tuple(p), max_new)] for p in prompts_ids]


def id_prompts(tok, lengths: list[int], start: int = 0, stride: int = 41) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, cut from LONG_TEXT at different offsets
    (with the tokenizer's bos first when it has one), so no two share a prefix."""
    stream = tok(LONG_TEXT, add_special_tokens=False).input_ids
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    prompts = []
    for i, n in enumerate(lengths):
        body = n - len(head)
        off = (start + i * stride) % len(stream)
        seq = (stream[off:] + stream)[:body]
        assert len(seq) == body, "LONG_TEXT is too short for this prompt length"
        prompts.append(head + seq)
    return prompts


def assert_all_blocks_returned(llm: LLM) -> None:
    bm, sched = llm.core.block_manager, llm.core.scheduler
    assert bm.num_free_blocks == bm.num_usable_blocks, "KV blocks leaked after generate()"
    assert all(b.ref_cnt == 0 for b in bm.blocks)
    assert not sched.waiting and not sched.running and not sched.requests
    assert not llm.core.has_unfinished()


def assert_equal_hf(model_dir, outs, expected=None) -> None:
    if expected is None:
        expected = hf_ref(model_dir, [o.prompt_token_ids for o in outs])
    for i, (o, ref) in enumerate(zip(outs, expected, strict=True)):
        assert len(o.outputs) == 1
        c = o.outputs[0]
        assert c.token_ids == ref, f"request {i} (prompt len {len(o.prompt_token_ids)}) differs from HF"
        assert c.finish_reason is not None
        # finish_reason agrees with how HF stopped
        if len(ref) < MAX_NEW:
            assert c.finish_reason == "stop"
        elif c.finish_reason == "stop":
            assert ref[-1] in _eos_ids(model_dir)
        else:
            assert c.finish_reason == "length"


def _eos_ids(model_dir) -> set[int]:
    eos = tiny_models.load_hf_model(model_dir).generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


# ---------------------------------------------------------------------------------------------
# basic equality, every model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_single_prompt(model, request):
    model_dir = request.getfixturevalue(model)
    llm = make_llm(model_dir)
    outs = llm.generate(TEXTS[1], GREEDY, use_tqdm=False)
    assert len(outs) == 1
    assert outs[0].prompt_token_ids == llm.get_tokenizer()(TEXTS[1]).input_ids
    assert_equal_hf(model_dir, outs)
    assert_all_blocks_returned(llm)


@pytest.mark.parametrize("model", MODELS)
def test_batch_of_different_lengths(model, request):
    model_dir = request.getfixturevalue(model)
    llm = make_llm(model_dir)
    tok = llm.get_tokenizer()
    lengths = [3, 150, 9, 17, 64, 33, 100]
    prompts = id_prompts(tok, lengths)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [len(o.prompt_token_ids) for o in outs] == lengths
    assert [o.prompt_token_ids for o in outs] == prompts  # results come back in prompt order
    assert_equal_hf(model_dir, outs)
    assert_all_blocks_returned(llm)


def test_sharded_checkpoint_matches_unsharded(tiny_qwen2, tiny_qwen2_sharded):
    prompts = id_prompts(make_llm(tiny_qwen2).get_tokenizer(), [7, 40])
    a = make_llm(tiny_qwen2).generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    b = make_llm(tiny_qwen2_sharded).generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_prompt_forms(tiny_llama):
    llm = make_llm(tiny_llama)
    tok = llm.get_tokenizer()
    text_a, text_b, text_c = TEXTS[0], TEXTS[6], TEXTS[8]
    ids_c = tok(text_c).input_ids
    outs = llm.generate([text_a, {"prompt": text_b}, {"prompt_token_ids": ids_c}], GREEDY, use_tqdm=False)
    assert outs[0].prompt_token_ids == tok(text_a).input_ids
    assert outs[1].prompt_token_ids == tok(text_b).input_ids
    assert outs[2].prompt_token_ids == ids_c
    assert outs[0].prompt == text_a and outs[1].prompt == text_b
    assert_equal_hf(tiny_llama, outs)
    # The same prompt in its three forms gives the same result.
    forms = [text_a, {"prompt": text_a}, {"prompt_token_ids": tok(text_a).input_ids}]
    again = llm.generate(forms, GREEDY, use_tqdm=False)
    assert all(o.outputs[0].token_ids == outs[0].outputs[0].token_ids for o in again)
    assert_all_blocks_returned(llm)


# ---------------------------------------------------------------------------------------------
# prefix caching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", *LARGE])
def test_prefix_cache_hits_keep_outputs_equal(model, request):
    model_dir = request.getfixturevalue(model)
    llm = make_llm(model_dir)
    bm = llm.core.block_manager
    tok = llm.get_tokenizer()
    common = id_prompts(tok, [85])[0]  # 5 full blocks of 16 + 5 tokens
    suffixes = id_prompts(tok, [12, 9, 20], start=300)
    suffixes = [s[1:] if tok.bos_token_id is not None else s for s in suffixes]  # no bos mid-prompt
    a, b, c = (common + s for s in suffixes)

    first = llm.generate({"prompt_token_ids": a}, GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    assert bm.num_hit_tokens == 0
    assert_equal_hf(model_dir, first)

    later = llm.generate([{"prompt_token_ids": b}, {"prompt_token_ids": c}], GREEDY, use_tqdm=False)
    assert bm.num_hit_tokens > 0
    for o in later:
        # the 5 full blocks of the shared prefix are reused; the partial 6th block is not
        assert o.num_cached_tokens == 80
    assert_equal_hf(model_dir, later)

    # The identical prompt again: every full block except the one holding the last token
    hits_before = bm.num_hit_tokens
    repeat = llm.generate({"prompt_token_ids": a}, GREEDY, use_tqdm=False)
    assert repeat[0].num_cached_tokens == ((len(a) - 1) // 16) * 16 > 0
    assert bm.num_hit_tokens > hits_before
    assert repeat[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert_equal_hf(model_dir, repeat)
    assert_all_blocks_returned(llm)


@pytest.mark.parametrize("length", [16, 64])
def test_prefix_cache_prompt_of_whole_blocks(tiny_llama, length):
    """A fully cached prompt that fills whole blocks: the last block is recomputed anyway (its
    last token must produce logits), so a repeat hits length - 16 tokens."""
    llm = make_llm(tiny_llama)
    p = id_prompts(llm.get_tokenizer(), [length], start=90)[0]
    outs = llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)
    outs += llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, length - 16]
    assert_equal_hf(tiny_llama, outs)
    assert_all_blocks_returned(llm)


def test_prefix_hit_on_generated_tokens(tiny_llama):
    """Blocks filled by decode steps are cached too: a prompt that continues an earlier request's
    prompt + output reuses them, and the KV written by decode equals what a prefill writes."""
    llm = make_llm(tiny_llama)
    tok = llm.get_tokenizer()
    a = id_prompts(tok, [30])[0]
    first = llm.generate({"prompt_token_ids": a}, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                         use_tqdm=False)
    gen = first[0].outputs[0].token_ids
    assert len(gen) == MAX_NEW
    # 30 + 23 tokens had their KV computed (the last sampled token never was): 3 full blocks
    b = a + gen + id_prompts(tok, [8], start=77)[0][1:]
    later = llm.generate({"prompt_token_ids": b}, GREEDY, use_tqdm=False)
    assert later[0].num_cached_tokens == 48
    assert_equal_hf(tiny_llama, later)
    assert_all_blocks_returned(llm)


def test_prefix_cache_with_eviction(tiny_llama):
    """A small pool: cached blocks are evicted and reused by later prompts; re-running earlier
    prompts (partly or no longer cached) still equals HF."""
    llm = make_llm(tiny_llama, num_gpu_blocks_override=13, max_model_len=128)
    tok = llm.get_tokenizer()
    prompts = id_prompts(tok, [40, 44, 48, 52, 56], start=3, stride=61)
    outs = []
    for p in prompts + prompts[::-1]:
        outs += llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)
        assert_all_blocks_returned(llm)
    assert llm.core.block_manager.num_hit_tokens > 0
    assert_equal_hf(tiny_llama, outs)


def test_max_num_seqs_limits_batch(tiny_llama):
    llm = make_llm(tiny_llama, max_num_seqs=2)
    log = _spy_steps(llm)
    prompts = id_prompts(llm.get_tokenizer(), [4, 30, 12, 50, 7])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert max(len(step) for step in log) == 2
    assert_equal_hf(tiny_llama, outs)
    assert_all_blocks_returned(llm)


def test_shared_prefix_in_one_batch(tiny_llama):
    """Requests sharing a prefix admitted in the same step (a later one may reuse blocks that an
    earlier one is writing in that very step) still equal HF."""
    llm = make_llm(tiny_llama)
    tok = llm.get_tokenizer()
    common = id_prompts(tok, [50])[0]
    tails = [s[1:] for s in id_prompts(tok, [6, 20, 3, 14], start=200)]
    outs = llm.generate([{"prompt_token_ids": common + t} for t in tails], GREEDY, use_tqdm=False)
    assert_equal_hf(tiny_llama, outs)
    assert_all_blocks_returned(llm)


def test_prefix_caching_disabled_equal(tiny_llama):
    llm = make_llm(tiny_llama, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    common = id_prompts(tok, [40])[0]
    prompts = [common + t[1:] for t in id_prompts(tok, [5, 9], start=100)]
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert all(o.num_cached_tokens == 0 for o in outs)
        assert_equal_hf(tiny_llama, outs)
    assert llm.core.block_manager.num_hit_tokens == 0
    assert_all_blocks_returned(llm)


# ---------------------------------------------------------------------------------------------
# chunked prefill
# ---------------------------------------------------------------------------------------------


def _spy_steps(llm: LLM) -> list[list[tuple[str, int, int]]]:
    """Record (request id, tokens scheduled, tokens computed before) for every executed step."""
    log: list[list[tuple[str, int, int]]] = []
    runner = llm.core.runner
    orig = runner.launch

    def launch(sched_out, prev=None):
        # a chained (async) step computes past the in-flight one's token
        log.append([(r.request_id, n, r.num_computed_tokens + r.num_pending_tokens) for r, n in sched_out.scheduled])
        return orig(sched_out, prev)

    runner.launch = launch
    return log


@pytest.mark.parametrize(
    "model,budget", [(m, b) for m in ("tiny_llama", "tiny_qwen2") for b in (16, 32)] + [(m, 16) for m in LARGE]
)
def test_chunked_prefill(model, budget, request):
    model_dir = request.getfixturevalue(model)
    llm = make_llm(model_dir, max_num_batched_tokens=budget)
    log = _spy_steps(llm)
    tok = llm.get_tokenizer()
    lengths = [5, 40, 77, 130]
    prompts = id_prompts(tok, lengths, start=11)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert_equal_hf(model_dir, outs)
    assert max(sum(n for _, n, _ in step) for step in log) <= budget
    # the long prompts really were prefilled in several chunks
    prompt_len = {o.request_id: len(o.prompt_token_ids) for o in outs}
    prefill_steps = {rid: 0 for rid in prompt_len}
    for step in log:
        for rid, n, done in step:
            if done < prompt_len[rid]:
                prefill_steps[rid] += 1
    for rid, n in prompt_len.items():
        assert prefill_steps[rid] >= -(-n // budget), "a prompt longer than the budget was not chunked"
    assert_all_blocks_returned(llm)


def test_chunked_prefill_with_prefix_hit(tiny_llama):
    """A prompt that partly hits the cache and prefills the rest in chunks."""
    llm = make_llm(tiny_llama, max_num_batched_tokens=16)
    tok = llm.get_tokenizer()
    common = id_prompts(tok, [70])[0]
    a, b = (common + t[1:] for t in id_prompts(tok, [30, 45], start=333))
    outs = llm.generate({"prompt_token_ids": a}, GREEDY, use_tqdm=False)
    outs += llm.generate({"prompt_token_ids": b}, GREEDY, use_tqdm=False)
    assert outs[1].num_cached_tokens == 64
    assert_equal_hf(tiny_llama, outs)
    assert_all_blocks_returned(llm)


# ---------------------------------------------------------------------------------------------
# preemption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,prefix_caching,budget",
    [("tiny_llama", True, None), ("tiny_llama", False, None), ("tiny_llama", True, 32), ("tiny_qwen2", True, None),
     ("tiny_llama_large", True, 32), ("tiny_qwen2_large", True, None)],
)
def test_preemption_by_recompute(model, prefix_caching, budget, request):
    model_dir = request.getfixturevalue(model)
    # 12 usable blocks of 16 tokens; 8 prompts of 35-49 tokens + up to 24 new ones need 4-5
    # blocks each, so at most 3 can run together and the scheduler must preempt.
    llm = make_llm(
        model_dir,
        num_gpu_blocks_override=13,
        max_model_len=128,
        enable_prefix_caching=prefix_caching,
        max_num_batched_tokens=budget,
    )
    assert llm.core.block_manager.num_usable_blocks == 12
    tok = llm.get_tokenizer()
    lengths = [35, 37, 39, 41, 43, 45, 47, 49]
    prompts = id_prompts(tok, lengths, start=5, stride=53)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.core.scheduler.num_preemptions > 0
    assert len(outs) == len(prompts)
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert_equal_hf(model_dir, outs)
    assert_all_blocks_returned(llm)


# ---------------------------------------------------------------------------------------------
# several eos ids (generation_config.eos_token_id is a list)
# ---------------------------------------------------------------------------------------------


def test_multiple_eos_ids(tiny_llama_gqa):
    llm = make_llm(tiny_llama_gqa)
    tok = llm.get_tokenizer()
    extra_eos = tok.convert_tokens_to_ids("Ġthe")
    assert _eos_ids(tiny_llama_gqa) == {tok.eos_token_id, extra_eos}

    # Find prompts where HF stops on the extra eos id (a regular token) before max tokens;
    # fall back to token-id prompts cut from LONG_TEXT if the fixed texts have none.
    candidates = [tok(t).input_ids for t in TEXTS]
    refs = hf_ref(tiny_llama_gqa, candidates)
    if not any(r[-1] == extra_eos and len(r) < MAX_NEW for r in refs):
        more = id_prompts(tok, [6 + 3 * i for i in range(24)], start=7, stride=29)
        candidates += more
        refs += hf_ref(tiny_llama_gqa, more)
    on_extra = [p for p, r in zip(candidates, refs) if len(r) < MAX_NEW and r[-1] == extra_eos]
    on_main = [p for p, r in zip(candidates, refs) if len(r) < MAX_NEW and r[-1] == tok.eos_token_id]
    assert on_extra, "no prompt found where HF stops on the second eos id"
    chosen = on_extra[:3] + on_main[:2]
    outs = llm.generate([{"prompt_token_ids": p} for p in chosen], GREEDY, use_tqdm=False)
    assert_equal_hf(tiny_llama_gqa, outs)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop"
        assert c.token_ids[-1] in (extra_eos, tok.eos_token_id)
        assert all(t not in (extra_eos, tok.eos_token_id) for t in c.token_ids[:-1])
    # Mixed with prompts that run to max_tokens, in one batch, the stops stay the same.
    others = [tok(TEXTS[i]).input_ids for i in (1, 7)]
    mixed = llm.generate([{"prompt_token_ids": p} for p in others + chosen], GREEDY, use_tqdm=False)
    assert_equal_hf(tiny_llama_gqa, mixed)
    assert_all_blocks_returned(llm)


# ---------------------------------------------------------------------------------------------
# KV blocks, chat
# ---------------------------------------------------------------------------------------------


def test_every_block_returned_after_mixed_finishes(tiny_llama):
    llm = make_llm(tiny_llama, num_gpu_blocks_override=40, max_model_len=128)
    tok = llm.get_tokenizer()
    greedy = llm.generate(TEXTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    ref_ids = greedy[0].outputs[0].token_ids
    prompts = [TEXTS[1], TEXTS[2], TEXTS[3], TEXTS[4], {"prompt_token_ids": id_prompts(tok, [60])[0]}, TEXTS[5]]
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref_ids[4]]),  # stop token
        SamplingParams(temperature=0, max_tokens=1),  # length after one token
        SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=10),  # parallel samples
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=MAX_NEW),
        # stop string: found in the front end, the request is aborted in the core
        SamplingParams(temperature=0, max_tokens=12, stop=[tok.decode(ref_ids[3:5]) or "the"]),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.finished for o in outs)
    assert len(outs[2].outputs) == 3
    assert_all_blocks_returned(llm)
    # and the pool is whole again: a request needing every block still runs
    big = llm.generate({"prompt_token_ids": id_prompts(tok, [100])[0]}, SamplingParams(temperature=0, max_tokens=20,
                                                                                      ignore_eos=True), use_tqdm=False)
    assert len(big[0].outputs[0].token_ids) == 20
    assert_all_blocks_returned(llm)


def test_chat_qwen2_equals_hf(tiny_qwen2):
    llm = make_llm(tiny_qwen2)
    tok = llm.get_tokenizer()
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly and clearly."},
            {"role": "user", "content": "Hello, world! How are you doing today?"},
            {"role": "assistant", "content": "I am fine, thank you."},
            {"role": "user", "content": "Tell me a story about a dragon."},
        ],
    ]
    expected_ids = []
    for conv in convs:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        expected_ids.append(tok(text, add_special_tokens=False).input_ids)

    single = llm.chat(convs[0], GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].prompt_token_ids == expected_ids[0]
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == expected_ids
    assert_equal_hf(tiny_qwen2, outs)
    assert outs[0].outputs[0].token_ids == single[0].outputs[0].token_ids
    assert_all_blocks_returned(llm)


def test_chat_llama_template_single_bos(tiny_llama):
    """The llama template writes bos itself; chat() must not add a second one."""
    llm = make_llm(tiny_llama)
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]
    outs = llm.chat(conv, GREEDY, use_tqdm=False)
    ids = outs[0].prompt_token_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert_equal_hf(tiny_llama, outs)


def test_chat_text_parts_equal_string_content(tiny_qwen2):
    llm = LLM(str(tiny_qwen2), dtype="float32", device="cpu", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=8)
    as_string = llm.chat([{"role": "user", "content": "Hello there"}], params, use_tqdm=False)[0]
    as_parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}], params, use_tqdm=False)[0]
    assert as_parts.prompt_token_ids == as_string.prompt_token_ids
    assert as_parts.outputs[0].token_ids == as_string.outputs[0].token_ids
