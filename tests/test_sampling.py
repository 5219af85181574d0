"""Sampling behaviour of the offline API, checked against independent computations.

Where a result can be computed without the engine it is: logprobs and prompt logprobs against
``log_softmax`` of the HF model's own logits, penalties and min_tokens against a greedy loop over
HF logits with vLLM's formulas re-implemented here, sampled frequencies against HF's softmax.
Everything else (seeds, stops, lengths, validation) is checked against vLLM's documented
semantics.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import tiny_models
import torch

from engine import LLM, SamplingParams

MAX_NEW = 24

TEXTS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "My phone number is 555-0123, call me after 6 pm.",
    "What is the meaning of life, the universe, and everything? It is 42.",
    "Please write a short poem about the sea and the sky.",
    "Water boils at 100 degrees Celsius and freezes at 0 degrees.",
    "In 1969, two astronauts walked on the Moon for the first time.",
    "A cat sat on the mat; a dog slept by the door.",
    "Can you tell me a story about a dragon and a knight?",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
    "List three fruits: apple, banana, cherry.",
    "Good morning! Good evening! Good night!",
    "She sells sea shells by the sea shore.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.718",
]
LONG_TEXT = (
    "Once upon a time, there was a little girl who lived in a village near the forest. The capital "
    "of France is Paris, and the capital of Japan is Tokyo. Machine learning models learn patterns "
    "from large amounts of data. The engine serves many requests at once using continuous batching. "
    "The weather today is sunny with a high of 25 degrees. Green trees, blue rivers, and tall "
    "mountains fill the valley. Reading books every day makes you smarter and calmer."
)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add spin-waiting on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(model_dir, **kwargs) -> LLM:
    args = {"dtype": "float32", "device": "cpu", "seed": 0, "max_model_len": 256, "block_size": 16,
            "enable_prefix_caching": True}
    args.update(kwargs)
    return LLM(str(model_dir), **args)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return make_llm(tiny_llama)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def greedy(llm):
    """Greedy outputs (eos ignored, 24 tokens) of every text: {text: CompletionOutput}."""
    outs = llm.generate(TEXTS, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    return {t: o.outputs[0] for t, o in zip(TEXTS, outs)}


@pytest.fixture(scope="module")
def greedy_eos(llm):
    """Greedy outputs with normal eos handling: {text: CompletionOutput}."""
    outs = llm.generate(TEXTS, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    return {t: o.outputs[0] for t, o in zip(TEXTS, outs)}


def eos_ids(model_dir) -> set[int]:
    eos = tiny_models.load_hf_model(model_dir).generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


@torch.no_grad()
def hf_logits(model_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits of the HF model (position i predicts token i + 1)."""
    return tiny_models.load_hf_model(model_dir)(torch.tensor([list(ids)])).logits[0].float()


def hf_greedy_loop(model_dir, prompt, max_new, *, stop_ids=(), min_tokens=0, process=None) -> list[int]:
    """Greedy decoding over HF logits with a full forward per step (no KV cache).

    ``process(logits, prompt, out)`` transforms the last logits; stop ids are masked while fewer
    than ``min_tokens`` tokens were generated and end generation (included) afterwards.
    """
    out: list[int] = []
    for _ in range(max_new):
        logits = hf_logits(model_dir, prompt + out)[-1].clone()
        if process is not None:
            logits = process(logits, prompt, out)
        if len(out) < min_tokens and stop_ids:
            logits[list(stop_ids)] = float("-inf")
        t = int(logits.argmax())
        out.append(t)
        if t in stop_ids and len(out) >= min_tokens:
            break
    return out


def vllm_penalties(logits, prompt, out, repetition=1.0, frequency=0.0, presence=0.0) -> torch.Tensor:
    """vLLM's apply_penalties, written out token by token:
    repetition: tokens seen in prompt or output are divided by the penalty when positive and
    multiplied by it otherwise; frequency/presence (OpenAI): logit -= f * count_in_output + p * [count > 0]."""
    logits = logits.clone()
    if repetition != 1.0:
        for t in set(prompt) | set(out):
            v = float(logits[t])
            logits[t] = v / repetition if v > 0 else v * repetition
    for t, count in Counter(out).items():
        logits[t] = logits[t] - frequency * count - presence
    return logits


def assert_pool_clean(llm: LLM) -> None:
    bm, sched = llm.core.block_manager, llm.core.scheduler
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert not sched.waiting and not sched.running and not sched.requests
    assert not llm.output_processor.requests


def ids_of(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


# ---------------------------------------------------------------------------------------------
# seeds and reproducibility
# ---------------------------------------------------------------------------------------------

SAMPLE = {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True}


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    p = TEXTS[1]
    seeded = SamplingParams(seed=1234, **SAMPLE)
    alone = llm.generate(p, seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(p, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    assert len(alone) == 16

    # Batched with different companions (unseeded, other seeds, greedy), at different positions.
    batch1 = llm.generate(
        [TEXTS[0], p, TEXTS[2]],
        [SamplingParams(**SAMPLE), seeded, SamplingParams(seed=99, **SAMPLE)],
        use_tqdm=False,
    )
    batch2 = llm.generate(
        [TEXTS[4], TEXTS[5], {"prompt_token_ids": llm.get_tokenizer()(LONG_TEXT).input_ids}, p],
        [SamplingParams(temperature=0.5, max_tokens=30), SamplingParams(temperature=0, max_tokens=3),
         SamplingParams(**SAMPLE), seeded],
        use_tqdm=False,
    )
    assert batch1[1].outputs[0].token_ids == alone
    assert batch2[3].outputs[0].token_ids == alone
    assert_pool_clean(llm)


def test_different_seeds_differ(llm):
    outs = llm.generate([TEXTS[1]] * 4, [SamplingParams(seed=s, **SAMPLE) for s in (1, 2, 3, 4)], use_tqdm=False)
    seqs = [tuple(o.outputs[0].token_ids) for o in outs]
    assert len(set(seqs)) == 4


def test_unseeded_reproducible_across_instances(tiny_llama):
    prompts = TEXTS[:3]
    params = SamplingParams(**SAMPLE)
    a = ids_of(make_llm(tiny_llama, seed=0).generate(prompts, params, use_tqdm=False))
    b = ids_of(make_llm(tiny_llama, seed=0).generate(prompts, params, use_tqdm=False))
    c = ids_of(make_llm(tiny_llama, seed=1).generate(prompts, params, use_tqdm=False))
    assert a == b
    assert a != c
    # unseeded requests in one engine draw fresh randomness: two identical prompts differ
    d = ids_of(make_llm(tiny_llama, seed=0).generate([prompts[0], prompts[0]], params, use_tqdm=False))
    assert d[0] != d[1]


def test_seeded_sampling_survives_preemption(llm, tiny_llama):
    """A seeded request that is preempted and recomputed samples the same tokens as one that ran
    uninterrupted (its generator state is kept, the recomputed prefill samples nothing)."""
    tok = llm.get_tokenizer()
    stream = tok(LONG_TEXT).input_ids
    prompts = [{"prompt_token_ids": stream[i * 7 : i * 7 + 38]} for i in range(6)]
    params = [SamplingParams(seed=100 + i, temperature=0.9, max_tokens=24, ignore_eos=True,
                             repetition_penalty=1.2) for i in range(6)]
    reference = ids_of(llm.generate(prompts, params, use_tqdm=False))
    tight = make_llm(tiny_llama, num_gpu_blocks_override=11, max_model_len=128)  # 10 blocks for 6 x 4
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.core.scheduler.num_preemptions > 0
    assert ids_of(outs) == reference
    assert_pool_clean(tight)


def test_n_samples_with_seed(llm, greedy):
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(TEXTS[2], params, use_tqdm=False)
    assert len(outs) == 1
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in comps)
    assert len({tuple(c.token_ids) for c in comps}) > 1
    again = llm.generate(TEXTS[2], params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in comps]
    # n greedy samples are all the greedy output
    g = llm.generate(TEXTS[2], SamplingParams(n=3, temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [c.token_ids for c in g[0].outputs] == [greedy[TEXTS[2]].token_ids] * 3
    assert_pool_clean(llm)


# ---------------------------------------------------------------------------------------------
# top-k / top-p / min-p against greedy and against HF's distribution
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 1, "temperature": 2.0, "seed": 3}],
    ids=["top_k=1", "top_p~0", "min_p=1", "top_k=1,seeded,T=2"],
)
def test_degenerate_filters_equal_greedy(llm, greedy, kwargs):
    base = {"temperature": 1.0, "max_tokens": MAX_NEW, "ignore_eos": True}
    base.update(kwargs)
    outs = llm.generate(TEXTS[:4], SamplingParams(**base), use_tqdm=False)
    assert ids_of(outs) == [greedy[t].token_ids for t in TEXTS[:4]]


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.8, "top_k": 5}, {"temperature": 1.3, "top_p": 0.6}], ids=["T0.8-topk5", "T1.3-topp0.6"]
)
def test_first_token_distribution_matches_hf(llm, tiny_llama, kwargs):
    """400 seeded one-token samples of one prompt: support inside the filtered set and frequencies
    close to HF's softmax(logits / T) renormalised over that set."""
    prompt = llm.get_tokenizer()(TEXTS[6]).input_ids
    n = 400
    outs = llm.generate([{"prompt_token_ids": prompt}] * n,
                        [SamplingParams(max_tokens=1, seed=10_000 + i, **kwargs) for i in range(n)], use_tqdm=False)
    counts = Counter(o.outputs[0].token_ids[0] for o in outs)

    probs = torch.softmax(hf_logits(tiny_llama, prompt)[-1] / kwargs["temperature"], dim=-1).double()
    order = probs.argsort(descending=True)
    if "top_k" in kwargs:
        keep = order[: kwargs["top_k"]]
    else:  # smallest prefix of the sorted distribution whose mass reaches top_p
        cum = probs[order].cumsum(0)
        keep = order[: int((cum < kwargs["top_p"]).sum()) + 1]
    expected = {int(t): float(probs[t] / probs[keep].sum()) for t in keep}
    assert len(expected) >= 2, "degenerate test: the filtered set has a single token"
    assert set(counts) <= set(expected), f"sampled outside the filtered set: {set(counts) - set(expected)}"
    tv = 0.5 * sum(abs(counts.get(t, 0) / n - p) for t, p in expected.items())
    assert tv < 0.1, f"total variation {tv:.3f} from HF's distribution"
    assert_pool_clean(llm)


# ---------------------------------------------------------------------------------------------
# stop strings, stop tokens, lengths
# ---------------------------------------------------------------------------------------------


def _pick_stop_string(text: str, n: int = 3, start_frac: float = 0.4) -> tuple[int, str]:
    """A printable-ASCII substring whose first occurrence is past ``start_frac`` of ``text``."""
    for k in range(max(1, int(len(text) * start_frac)), len(text) - n):
        s = text[k : k + n]
        if all(c.isascii() and c.isprintable() for c in s) and text.find(s) == k:
            return k, s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("text_idx", [1, 4, 7])
def test_stop_string(llm, tok, greedy, text_idx):
    prompt = TEXTS[text_idx]
    full = greedy[prompt]
    k, stop = _pick_stop_string(full.text)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, stop=[stop])
    other = TEXTS[0]
    outs = llm.generate([prompt, other], [params, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)],
                        use_tqdm=False)
    c = outs[0].outputs[0]
    assert c.text == full.text[:k]
    assert stop not in c.text
    assert c.finish_reason == "stop" and c.stop_reason == stop
    # generation stopped at the token that completed the stop string
    assert c.token_ids == full.token_ids[: len(c.token_ids)]
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])
    assert outs[1].outputs[0].token_ids == greedy[other].token_ids  # the neighbour is unaffected

    incl = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, stop=stop,
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert incl.text == full.text[: k + len(stop)]
    assert incl.finish_reason == "stop" and incl.stop_reason == stop
    assert incl.token_ids == c.token_ids

    # of several stop strings the earliest match wins
    later = full.text[-3:] if full.text.find(full.text[-3:]) > k else None
    if later:
        multi = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                                    stop=[later, stop]), use_tqdm=False)[0].outputs[0]
        assert multi.text == full.text[:k] and multi.stop_reason == stop
    assert_pool_clean(llm)


def _pick_stop_token(ids: list[int], tok, min_pos: int = 3) -> int:
    special = set(tok.all_special_ids)
    for j in range(min_pos, len(ids) - 2):
        if ids[j] not in ids[:j] and ids[j] not in special:
            return j
    raise AssertionError("no usable stop token")


def test_stop_token_ids(llm, tok, greedy):
    full = greedy[TEXTS[1]]
    j = _pick_stop_token(full.token_ids, tok)
    t = full.token_ids[j]
    for ignore_eos in (False, True):  # ignore_eos does not disable stop_token_ids
        c = llm.generate(TEXTS[1], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[t],
                                                  ignore_eos=ignore_eos), use_tqdm=False)[0].outputs[0]
        assert c.token_ids == full.token_ids[: j + 1]
        assert c.finish_reason == "stop"
        assert c.stop_reason == t
    assert_pool_clean(llm)


def test_stop_token_text_is_excluded_like_vllm(llm, tok, greedy):
    """vLLM renders no text for the token that stopped generation (eos or stop_token_ids) unless
    include_stop_str_in_output=True; the id stays in token_ids."""
    full = greedy[TEXTS[1]]
    j = _pick_stop_token(full.token_ids, tok)
    t = full.token_ids[j]
    assert tok.decode([t]), "stop token should render as text for this check to mean anything"
    c = llm.generate(TEXTS[1], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[t]),
                     use_tqdm=False)[0].outputs[0]
    assert c.token_ids[-1] == t
    assert c.text == tok.decode(full.token_ids[:j], skip_special_tokens=True)
    incl = llm.generate(TEXTS[1], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[t],
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert incl.text == tok.decode(full.token_ids[: j + 1], skip_special_tokens=True)


def _early_eos_prompt(greedy_eos, eos: set[int], max_len: int = 12) -> str:
    for t in TEXTS:
        c = greedy_eos[t]
        if c.finish_reason == "stop" and c.token_ids[-1] in eos and len(c.token_ids) <= max_len:
            return t
    raise AssertionError("no prompt in TEXTS stops on eos early")


@pytest.mark.parametrize("offset", [-1, 0, 4], ids=["before-eos", "at-eos", "past-eos"])
def test_min_tokens_suppresses_eos(llm, tok, tiny_llama, greedy_eos, offset):
    """The prompt's greedy output ends with eos as token number n; min_tokens = n - 1 leaves it
    alone, min_tokens = n (the boundary) and n + 4 mask it, like vLLM (stop ids are masked while
    fewer than min_tokens tokens were generated)."""
    eos = eos_ids(tiny_llama)
    prompt = _early_eos_prompt(greedy_eos, eos)
    original = greedy_eos[prompt].token_ids
    m = len(original) + offset
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=m)
    c = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    expected = hf_greedy_loop(tiny_llama, tok(prompt).input_ids, MAX_NEW, stop_ids=eos, min_tokens=m)
    assert c.token_ids == expected
    assert not set(c.token_ids[:m]) & eos
    if offset < 0:
        assert c.token_ids == original
    else:
        assert len(c.token_ids) > len(original)
    assert c.finish_reason == ("stop" if expected[-1] in eos else "length")


@pytest.mark.parametrize("offset", [0, 1, 3], ids=["at-stop", "boundary", "past-stop"])
def test_min_tokens_suppresses_stop_token_ids(llm, tok, tiny_llama, greedy, offset):
    prompt = TEXTS[1]
    full = greedy[prompt].token_ids
    j = _pick_stop_token(full, tok)
    t = full[j]  # token number j + 1 of the greedy output
    m = j + offset
    c = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, stop_token_ids=[t],
                                            min_tokens=m), use_tqdm=False)[0].outputs[0]
    expected = hf_greedy_loop(tiny_llama, tok(prompt).input_ids, MAX_NEW, stop_ids={t}, min_tokens=m)
    assert c.token_ids == expected
    assert t not in c.token_ids[:m]
    if offset == 0:
        assert c.token_ids == full[: j + 1]
    else:
        assert len(c.token_ids) > j + 1
    if expected[-1] == t:
        assert c.finish_reason == "stop" and c.stop_reason == t
    else:
        assert c.finish_reason == "length"


def test_max_tokens_length(llm, greedy):
    for n in (1, 5):
        c = llm.generate(TEXTS[1], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
        assert c.token_ids == greedy[TEXTS[1]].token_ids[:n]
        assert c.finish_reason == "length" and c.stop_reason is None


def test_max_model_len_caps_generation(tiny_llama):
    small = make_llm(tiny_llama, max_model_len=32)
    ids = small.get_tokenizer()(LONG_TEXT).input_ids[:28]
    for params in (SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)):
        c = small.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
        assert len(c.token_ids) == 4
        assert c.finish_reason == "length"
    assert_pool_clean(small)


def test_ignore_eos(llm, tok, tiny_llama, greedy_eos):
    eos = eos_ids(tiny_llama)
    prompt = _early_eos_prompt(greedy_eos, eos)
    stopped = greedy_eos[prompt]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    c = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) == 16 and c.finish_reason == "length"
    assert c.token_ids[: len(stopped.token_ids)] == stopped.token_ids  # runs through the eos
    assert c.token_ids == hf_greedy_loop(tiny_llama, tok(prompt).input_ids, 16)


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def test_text_equals_decode(llm, tok, greedy, greedy_eos):
    for c in list(greedy.values()) + list(greedy_eos.values()):
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # skip_special_tokens=False renders the eos
    prompt = _early_eos_prompt(greedy_eos, {tok.eos_token_id})
    c = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW, skip_special_tokens=False,
                                            include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=False)
    assert c.text.endswith(tok.eos_token)


# ---------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------


def _check_position(entry, lp_row: torch.Tensor, chosen: int, k: int, tok) -> None:
    top_vals, top_ids = lp_row.topk(k) if k else (lp_row[:0], lp_row[:0].long())
    expected_ids = set(top_ids.tolist()) | {chosen}
    assert set(entry) == expected_ids
    assert math.isclose(entry[chosen].logprob, float(lp_row[chosen]), abs_tol=1e-4)
    assert entry[chosen].rank == int((lp_row > lp_row[chosen]).sum()) + 1
    for r, (t, v) in enumerate(zip(top_ids.tolist(), top_vals.tolist()), start=1):
        assert math.isclose(entry[t].logprob, v, abs_tol=1e-4)
        assert entry[t].rank == r
    for t, lp in entry.items():
        assert lp.decoded_token == tok.decode([t])


@pytest.mark.parametrize(
    "kwargs,k",
    [({"temperature": 0}, 5), ({"temperature": 0}, 0), ({"temperature": 0.7, "seed": 11}, 3),
     ({"temperature": 1.0, "seed": 5, "repetition_penalty": 1.5}, 2)],
    ids=["greedy-k5", "greedy-k0", "sampled-T0.7-k3", "sampled-penalised-k2"],
)
def test_logprobs_match_hf(llm, tok, tiny_llama, kwargs, k):
    """Logprobs are those of the raw model distribution (before temperature and penalties, vLLM's
    default), for the chosen token plus the top k."""
    prompts = [TEXTS[0], TEXTS[5]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True, logprobs=k, **kwargs), use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == 10
        lp = torch.log_softmax(hf_logits(tiny_llama, o.prompt_token_ids + c.token_ids), dim=-1)
        start = len(o.prompt_token_ids) - 1
        for i, (entry, chosen) in enumerate(zip(c.logprobs, c.token_ids)):
            _check_position(entry, lp[start + i], chosen, k, tok)
        assert math.isclose(c.cumulative_logprob, sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)),
                            abs_tol=1e-4)
    if kwargs["temperature"] == 0:
        assert all(e[t].rank == 1 for o in outs for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids))


def test_no_logprobs_by_default(llm):
    o = llm.generate(TEXTS[0], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert o.outputs[0].logprobs is None and o.prompt_logprobs is None


def _check_prompt_logprobs(o, model_dir, k, tok) -> None:
    ids = o.prompt_token_ids
    assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == len(ids)
    assert o.prompt_logprobs[0] is None
    lp = torch.log_softmax(hf_logits(model_dir, ids), dim=-1)
    for i in range(1, len(ids)):
        _check_position(o.prompt_logprobs[i], lp[i - 1], ids[i], k, tok)


def test_prompt_logprobs_match_hf(llm, tok, tiny_llama):
    long_ids = tok(LONG_TEXT).input_ids[:45]
    # Cache the long prompt first: a prompt_logprobs request must still score every position.
    llm.generate({"prompt_token_ids": long_ids}, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    outs = llm.generate(
        [TEXTS[0], {"prompt_token_ids": long_ids}, TEXTS[3]],
        [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3),
         SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=5, logprobs=2),
         SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0)],
        use_tqdm=False,
    )
    for o, k in zip(outs, (3, 5, 0)):
        _check_prompt_logprobs(o, tiny_llama, k, tok)
    assert_pool_clean(llm)


def test_prompt_logprobs_with_chunked_prefill(tiny_llama):
    small = make_llm(tiny_llama, max_num_batched_tokens=16)
    tok = small.get_tokenizer()
    ids = tok(LONG_TEXT).input_ids[:50]
    outs = small.generate([{"prompt_token_ids": ids}, TEXTS[2]], SamplingParams(temperature=0, max_tokens=4,
                                                                                 prompt_logprobs=4), use_tqdm=False)
    for o in outs:
        _check_prompt_logprobs(o, tiny_llama, 4, tok)
    assert_pool_clean(small)


def test_prompt_logprobs_under_preemption(tiny_llama):
    """Prompts scored, preempted and recomputed still get exactly one entry per position."""
    tight = make_llm(tiny_llama, num_gpu_blocks_override=11, max_model_len=128, max_num_batched_tokens=32)
    tok = tight.get_tokenizer()
    stream = tok(LONG_TEXT).input_ids
    prompts = [{"prompt_token_ids": stream[i * 9 : i * 9 + 36]} for i in range(6)]
    outs = tight.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2),
                          use_tqdm=False)
    assert tight.core.scheduler.num_preemptions > 0
    for o in outs:
        _check_prompt_logprobs(o, tiny_llama, 2, tok)
    assert_pool_clean(tight)


# ---------------------------------------------------------------------------------------------
# penalties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pen",
    [{"repetition_penalty": 1.8}, {"repetition_penalty": 0.6}, {"frequency_penalty": 1.5},
     {"frequency_penalty": -0.8}, {"presence_penalty": 1.5},
     {"repetition_penalty": 1.3, "frequency_penalty": 0.7, "presence_penalty": -0.5}],
    ids=["rep1.8", "rep0.6", "freq1.5", "freq-0.8", "pres1.5", "combined"],
)
def test_penalties_match_reference(llm, tok, tiny_llama, greedy, pen):
    """Temperature 0 with penalties is deterministic: compare with a greedy loop over HF logits
    using vLLM's penalty formulas."""
    n = MAX_NEW
    prompts = [TEXTS[1], TEXTS[11], TEXTS[13]]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **pen)
    # batched with a plain greedy request of the same prompt: penalties stay per request
    outs = llm.generate(prompts + [prompts[0]], [params] * 3 + [SamplingParams(temperature=0, max_tokens=n,
                                                                              ignore_eos=True)], use_tqdm=False)
    assert outs[3].outputs[0].token_ids == greedy[prompts[0]].token_ids

    def process(logits, prompt, out):
        return vllm_penalties(logits, prompt, out, pen.get("repetition_penalty", 1.0),
                              pen.get("frequency_penalty", 0.0), pen.get("presence_penalty", 0.0))

    changed = False
    for p, o in zip(prompts, outs):
        expected = hf_greedy_loop(tiny_llama, tok(p).input_ids, n, process=process)
        assert o.outputs[0].token_ids == expected
        changed |= expected != greedy[p].token_ids
    assert changed, "penalty had no effect on these prompts: the test would not detect a missing penalty"


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert field in str(err.value)


def test_valid_edge_values_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, n=1, max_tokens=1, min_tokens=1, logprobs=0,
                   presence_penalty=2.0, frequency_penalty=-2.0, stop="x")
    assert SamplingParams(stop="ab").stop == ["ab"]
    assert SamplingParams(top_k=-1).top_k in (0, -1)


def test_too_long_prompt_rejected_before_queuing(tiny_llama):
    small = make_llm(tiny_llama, max_model_len=32)
    tok = small.get_tokenizer()
    stream = tok(LONG_TEXT).input_ids
    too_long, longest_ok = stream[:32], stream[:31]
    sched = small.core.scheduler

    with pytest.raises(ValueError, match="prompt"):
        small.generate({"prompt_token_ids": too_long}, SamplingParams(max_tokens=4), use_tqdm=False)
    assert not sched.waiting and not sched.running and not sched.requests
    assert not small.core.has_unfinished() and not small.output_processor.requests

    # one bad prompt in a list: nothing is queued, not even the good ones before it
    bad_lists = [
        [TEXTS[0], {"prompt_token_ids": too_long}, TEXTS[1]],
        [TEXTS[0], {"prompt_token_ids": [1, 10**6]}],  # id outside the vocabulary
        [TEXTS[0], {"prompt_token_ids": []}],
    ]
    for prompts in bad_lists:
        with pytest.raises(ValueError):
            small.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert not sched.waiting and not sched.running and not sched.requests
        assert not small.output_processor.requests
    assert small.core.block_manager.num_free_blocks == small.core.block_manager.num_usable_blocks

    # the engine still works afterwards, and max_model_len - 1 tokens is the longest valid prompt
    outs = small.generate([TEXTS[0], {"prompt_token_ids": longest_ok}],
                          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 4
    assert len(outs[1].outputs[0].token_ids) == 1 and outs[1].outputs[0].finish_reason == "length"
    assert_pool_clean(small)


def test_half_precision_logits_are_upcast_only_where_needed():
    """The runner hands the sampler logits in the model's dtype: a greedy row's argmax (with
    min_tokens masking) equals the fp32 argmax of the same values, bit for bit; penalties,
    sampling and logprobs see fp32 logits, as with fp32 input."""
    from engine.request import EngineRequest, Request
    from engine.sampler import Sampler

    sampler = Sampler(torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = 300
    logits = (torch.randn(6, vocab, generator=g) * 3).to(torch.bfloat16)
    logits[0, 7] = logits[0, 11] = logits[0].max() + 1  # a tie: the first index wins either way

    def reqs(**kw):
        out = []
        for i in range(logits.shape[0]):
            p = SamplingParams(**kw)
            p._all_stop_token_ids = {5, int(logits[i].float().argmax())}  # as with_eos sets it
            req = Request(EngineRequest(f"r{i}", [1, 2, 3], p), 64)
            if p.seed is not None:  # as the runner does before sampling
                req.generator = sampler.make_generator(p.seed + i)
            out.append(req)
        return out

    for kw in ({"temperature": 0.0}, {"temperature": 0.0, "min_tokens": 3}):
        half, _ = sampler.sample(logits.clone(), reqs(**kw))
        full, _ = sampler.sample(logits.float(), reqs(**kw))
        assert torch.equal(half, full), kw
    assert sampler.sample(logits.clone(), reqs(temperature=0.0))[0][0].item() == 7
    # rows that compute with the logits: the same result from bf16 input as from its fp32 copy
    for kw in ({"temperature": 0.0, "repetition_penalty": 1.3, "presence_penalty": 0.5},
               {"temperature": 0.0, "logprobs": 3}, {"temperature": 0.8, "seed": 1}):
        half, lp_half = sampler.sample(logits.clone(), reqs(**kw))
        full, lp_full = sampler.sample(logits.float(), reqs(**kw))
        assert torch.equal(half, full), kw
        assert lp_half == lp_full, kw


@pytest.mark.parametrize("clean_up", [False, True])
def test_final_outputs_ending_together_decode_like_tokenizer_decode(tok, clean_up, monkeypatch):
    """Final-only requests that end in the same step are detokenised in one batch
    (``output_processor.flush_all``); each text must equal ``tokenizer.decode`` of its ids, with
    and without skipping special tokens, and through HF's own path when the tokenizer cleans up
    spaces (then flush_all must not take the batch path)."""
    from engine.engine_core import EngineCoreOutput
    from engine.output_processor import OutputKind, OutputProcessor

    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", clean_up, raising=False)
    g = torch.Generator().manual_seed(11)
    vocab = len(tok)
    op = OutputProcessor(tok)
    outs, expected = [], {}
    for i in range(24):
        ids = torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        ids[0] = tok.all_special_ids[0] if i % 3 == 0 else ids[0]  # special tokens to skip or keep
        params = SamplingParams(max_tokens=len(ids), skip_special_tokens=i % 2 == 0)
        op.add_request(f"r{i}", "p", [1], {f"r{i}": params}, OutputKind.FINAL_ONLY)
        outs.append(EngineCoreOutput(f"r{i}", ids, finish_reason="length"))
        expected[f"r{i}"] = tok.decode(ids, skip_special_tokens=params.skip_special_tokens)
    calls = []
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None:
        real = backend.decode_batch
        monkeypatch.setattr(tok, "_tokenizer", type("Spy", (), {
            "decode_batch": lambda self, *a, **k: calls.append(1) or real(*a, **k),
            "__getattr__": lambda self, name: getattr(backend, name)})())
    ready, _ = op.process(outs)
    assert {o.request_id: o.outputs[0].text for o in ready} == expected
    assert all(o.finished for o in ready) and len(ready) == 24
    if backend is not None:
        assert (len(calls) == 2) == (not clean_up)  # one batch per skip_special_tokens value


def test_engine_start_freezes_the_heap(llm):
    """Objects alive once the engine is up are out of the garbage collector's sight
    (engine_core.freeze_heap): a full collection during serving then walks only what serving made."""
    import gc

    assert gc.get_freeze_count() > 100_000  # torch, transformers, the model: hundreds of thousands
