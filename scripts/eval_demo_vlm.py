"""Accuracy of ``vlmserve-demo`` on held-out synthetic pictures, measured four ways.

    python scripts/eval_demo_vlm.py [--n 200] [--model vlmserve-demo] [--ways offline,openai,v2,hf]

The pictures come from ``runtime.demo_pictures.held_out_examples`` (a seed the training never
used); every question is greedy, at most 8 new tokens. The ways:

* offline: ``engine.LLM.chat`` with the PIL picture;
* openai: the running server (``python -m runtime``, started here) through the openai client, the
  picture sent as a PNG data URL;
* v2: the same server through tritonclient's KServe v2 HTTP infer (the chat-templated prompt as
  ``text_input``, the PNG bytes as ``image``);
* hf: transformers' ``Qwen2VLForConditionalGeneration.generate`` with the HF image processor.

It prints, per question kind, the accuracy of each way and how many answers of each way are the
offline engine's answer token for token (text and token count for the server; token ids for HF).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.demo_pictures import KINDS, Example, chat_messages, held_out_examples, png_bytes, png_data_url  # noqa: E402

MAX_TOKENS = 8
# (text, number of generated tokens) per example: what every way is compared on.
Answer = tuple[str, int]


def run_offline(model: str, examples: list[Example]) -> tuple[list[Answer], list[list[int]]]:
    from engine import LLM, SamplingParams

    llm = LLM(model=model, seed=0)
    outs = llm.chat([chat_messages(e.question, e.picture.image) for e in examples],
                    SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs], [list(o.outputs[0].token_ids) for o in outs]


class Server:
    """``python -m runtime`` serving ``model`` as ``vlmserve-demo`` on free local ports."""

    def __init__(self, model: str) -> None:
        import socket

        def free() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        self.port, self.grpc_port = free(), free()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "--model_name=vlmserve-demo", f"--model_dir={model}",
             "--http_port", str(self.port), "--grpc_port", str(self.grpc_port), "--host", "127.0.0.1"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_openai(port: int, examples: list[Example]) -> list[Answer]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")

    def ask(e: Example) -> Answer:
        r = client.chat.completions.create(model="vlmserve-demo", temperature=0, max_tokens=MAX_TOKENS,
                                           messages=chat_messages(e.question, png_data_url(e.picture.image)))
        return r.choices[0].message.content, r.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:  # concurrent requests: the server batches them
        return list(pool.map(ask, examples))


def run_v2(port: int, model: str, examples: list[Example]) -> list[Answer]:
    import numpy as np
    import tritonclient.http as httpclient
    from transformers import AutoTokenizer

    from engine.loader import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(model)))
    params = json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS}).encode()

    def ask(e: Example) -> Answer:
        # v2 infer takes a raw prompt: render the chat template, whose image placeholder the
        # server expands for the picture.
        prompt = tok.apply_chat_template(chat_messages(e.question, e.picture.image), tokenize=False,
                                         add_generation_prompt=True)
        inputs = []
        for name, dtype, value in (("text_input", "BYTES", prompt.encode()), ("image", "BYTES", png_bytes(e.picture.image)),
                                   ("sampling_parameters", "BYTES", params), ("exclude_input_in_output", "BOOL", True)):
            t = httpclient.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
            inputs.append(t)
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            r = client.infer("vlmserve-demo", inputs)
        finally:
            client.close()
        return r.as_numpy("text_output")[0].decode(), int(r.as_numpy("num_output_tokens")[0])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, examples))


def run_hf(model: str, examples: list[Example]) -> tuple[list[Answer], list[list[int]]]:
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    from engine.loader import resolve_model_dir

    path = str(resolve_model_dir(model))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok, ip = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    pad, answers, ids_out = hf.config.image_token_id, [], []
    for e in examples:
        text = tok.apply_chat_template(chat_messages(e.question, e.picture.image), tokenize=False,
                                       add_generation_prompt=True)
        o = ip(images=[e.picture.image], return_tensors="pt")
        ids: list[int] = []
        for t in tok(text).input_ids:  # one placeholder -> one pad per merged 2 x 2 patch group
            ids += [t] * (math.prod(o["image_grid_thw"][0].tolist()) // 4) if t == pad else [t]
        inp = torch.tensor([ids])
        with torch.no_grad():
            g = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), pixel_values=o["pixel_values"],
                            image_grid_thw=o["image_grid_thw"], mm_token_type_ids=(inp == pad).int(),
                            do_sample=False, max_new_tokens=MAX_TOKENS)
        new = g[0, len(ids):].tolist()
        ids_out.append(new)
        answers.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return answers, ids_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vlmserve-demo", help="the checkpoint (default: the bundled demo)")
    p.add_argument("--n", type=int, default=200, help="held-out pictures per question kind")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--ways", default="offline,openai,v2,hf")
    args = p.parse_args()
    kinds, ways = args.kinds.split(","), args.ways.split(",")
    examples = [e for k in kinds for e in held_out_examples(k, args.n)]

    t0 = time.time()
    server = Server(args.model) if {"openai", "v2"} & set(ways) else None  # starts while offline runs
    answers: dict[str, list[Answer]] = {}
    answers["offline"], offline_ids = run_offline(args.model, examples)
    timing = {"offline": time.time() - t0}
    try:
        if server is not None:
            server.wait_ready()
        for way in ways[1:] if ways[0] == "offline" else ways:
            t = time.time()
            if way == "openai":
                answers[way] = run_openai(server.port, examples)
            elif way == "v2":
                answers[way] = run_v2(server.port, args.model, examples)
            elif way == "hf":
                answers[way], hf_ids = run_hf(args.model, examples)
            timing[way] = time.time() - t
    finally:
        if server is not None:
            server.stop()

    shown = [w for w in ways if w in answers]
    print(f"{args.n} held-out pictures per question kind; accuracy (answers equal to offline, token for token)")
    print(f"| question | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for k in kinds:
        idx = [i for i, e in enumerate(examples) if e.kind == k]
        cells = []
        for w in shown:
            acc = sum(answers[w][i][0].strip() == examples[i].answer for i in idx) / len(idx)
            if w == "offline":
                cells.append(f"{acc:.1%}")
            else:
                same = sum((hf_ids[i] == offline_ids[i]) if w == "hf" else (answers[w][i] == answers["offline"][i])
                           for i in idx)
                cells.append(f"{acc:.1%} ({same}/{len(idx)})")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("seconds: " + ", ".join(f"{w} {t:.0f}" for w, t in timing.items()))
    wrong = [(e.kind, e.question, e.answer, answers["offline"][i][0]) for i, e in enumerate(examples)
             if answers["offline"][i][0].strip() != e.answer]
    for w in wrong[:10]:
        print("offline wrong:", w)


if __name__ == "__main__":
    main()
