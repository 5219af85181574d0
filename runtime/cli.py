"""The ``vlmserve`` command line.

* ``vlmserve generate [MODEL] --prompt TEXT ...`` runs an offline generation with ``engine.LLM``
  and prints each prompt and its output. Without MODEL it uses the bundled demo checkpoint
  ``vlmserve-demo`` (``runtime.demo_vlm``: a tiny VLM trained on synthetic pictures, so text
  alone gets no meaningful answer).
* ``vlmserve serve [MODEL] [flags]`` starts the server (see runtime.serve), like ``vllm serve``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from runtime.args import normalize_argv
from runtime.compat_args import apply_vllm_compat
from runtime.serve import add_serve_args, run_serve



def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmserve", description="vlmserve: a serving runtime for vision-language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser(
        "generate",
        help="run an offline generation and print the output",
        description=(
            "Run an offline generation through engine.LLM and print each prompt and its output. "
            "Without MODEL, the bundled demo model vlmserve-demo is used: a tiny VLM that knows "
            "only synthetic pictures of coloured shapes, so text-only prompts get no meaningful "
            "answer (ask it about a picture with `vlmserve serve` or engine.LLM.chat)."
        ),
    )
    gen.add_argument("model", nargs="?", default=None, metavar="MODEL",
                     help="a local model folder or a Hugging Face hub id (default: the demo model)")
    gen.add_argument("--prompt", "-p", action="append", required=True, metavar="TEXT",
                     help="the prompt; repeat to generate for several prompts in one batch")
    gen.add_argument("--max-tokens", type=int, default=32, metavar="N",
                     help="maximum number of new tokens per prompt (default: 32)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="sampling temperature; 0 is greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default: 1)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument("--device", default="auto",
                     help="auto | cpu | cuda[:i] | mlu[:i] (default: auto: CUDA, then MLU, then CPU)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="model dtype (default: auto: the checkpoint's dtype where the device supports it)")
    gen.add_argument("--max-model-len", type=int, default=None, metavar="N",
                     help="maximum sequence length (default: the model's)")
    gen.set_defaults(func=_cmd_generate)

    serve = sub.add_parser(
        "serve",
        help="start the server: OpenAI routes and KServe v2 REST on --port, v2 gRPC on --grpc-port",
        description="Serve MODEL (default: the bundled demo model) like `vllm serve`.",
    )
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)
    return parser


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    model = args.model
    if model is None:
        from runtime.demo_vlm import DEMO_MODEL_NAME

        print(f"vlmserve: using the demo model {DEMO_MODEL_NAME}, which knows only synthetic pictures "
              "of coloured shapes: text-only prompts get no meaningful answer", file=sys.stderr)
        model = DEMO_MODEL_NAME
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        llm = LLM(model=model, device=args.device, dtype=args.dtype, seed=args.seed,
                  max_model_len=args.max_model_len)
    except ValueError as exc:
        print(f"vlmserve generate: error: {exc}", file=sys.stderr)
        return 2
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for out in outputs:
        print(f"Prompt: {out.prompt!r}")
        print(f"Output: {out.outputs[0].text!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]
    if argv and argv[0] == "serve":  # accept --max_model_len as well as --max-model-len
        argv = ["serve", *normalize_argv(argv[1:], serve_parser)]
    args = parser.parse_args(argv)
    if args.command == "serve":
        apply_vllm_compat(args, serve_parser)  # -tp 2 and the like: a clear error, exit code 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
