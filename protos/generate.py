"""Compile protos/v2_grpc_predict.proto into runtime/v2_grpc_predict_pb2{,_grpc}.py (committed).

    python protos/generate.py            # rewrite the modules
    python protos/generate.py --check    # exit 1 if the committed modules are stale

Uses grpcio-tools (a development/test dependency only: the server imports the committed
modules and needs just grpcio and protobuf at run time). Two edits to protoc's output:

* the messages are built in a private ``DescriptorPool``, not protobuf's default pool: KServe's
  ``grpc_predict_v2_pb2`` (always imported by the server) and tritonclient's ``service_pb2``
  register the same ``inference.*`` names there, and a second registration of a symbol in one
  pool is a TypeError ("duplicate symbol"), so the default pool can hold only one of them;
* the ``_pb2_grpc`` module imports its ``_pb2`` from the ``runtime`` package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "v2_grpc_predict.proto"
OUT = ROOT / "runtime"
STEM = PROTO.stem

_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# vlmserve: a private pool, so that KServe's and tritonclient's inference.* messages can be\n"
    "# imported in the same process (see protos/generate.py).\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def generate() -> dict[str, str]:
    """{file name: text} of the generated modules."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        pb2 = (Path(tmp) / f"{STEM}_pb2.py").read_text()
        grpc_mod = (Path(tmp) / f"{STEM}_pb2_grpc.py").read_text()
    if _POOL_LINE not in pb2:
        raise RuntimeError("unexpected protoc output: no default-pool registration line")
    pb2 = pb2.replace(_POOL_LINE, _PRIVATE_POOL, 1)
    plain_import = f"import {STEM}_pb2 as "
    if plain_import not in grpc_mod:
        raise RuntimeError("unexpected grpc_tools output: no _pb2 import")
    grpc_mod = grpc_mod.replace(plain_import, f"from runtime import {STEM}_pb2 as ", 1)
    return {f"{STEM}_pb2.py": pb2, f"{STEM}_pb2_grpc.py": grpc_mod}


def compiled_descriptor() -> bytes:
    """The proto's FileDescriptorProto as protoc compiles it now (serialized)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    file = files[0]
    for message in _all_messages(file.message_type):  # the Python generator leaves json_name out
        for f in message.field:
            f.ClearField("json_name")
    return file.SerializeToString()


def _all_messages(messages):
    for m in messages:
        yield m
        yield from _all_messages(m.nested_type)


def stale() -> list[str]:
    """What differs between the proto and the committed modules: compared as descriptors (not
    text), so another grpcio-tools version (other version stamps in the output) still matches."""
    import importlib

    from google.protobuf import descriptor_pb2

    bad = [name for name in (f"{STEM}_pb2.py", f"{STEM}_pb2_grpc.py") if not (OUT / name).is_file()]
    if bad:
        return bad
    sys.path.insert(0, str(ROOT))
    try:
        committed = importlib.import_module(f"runtime.{STEM}_pb2")
    finally:
        sys.path.remove(str(ROOT))
    have = descriptor_pb2.FileDescriptorProto.FromString(committed.DESCRIPTOR.serialized_pb)
    want = descriptor_pb2.FileDescriptorProto.FromString(compiled_descriptor())
    grpc_text = (OUT / f"{STEM}_pb2_grpc.py").read_text()
    methods_ok = all(f"'/inference.GRPCInferenceService/{m.name}'" in grpc_text for m in want.service[0].method)
    return ([f"{STEM}_pb2.py"] if have != want else []) + ([] if methods_ok else [f"{STEM}_pb2_grpc.py"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed modules are current")
    args = parser.parse_args()
    if args.check:
        bad = stale()
        if bad:
            print(f"stale: {', '.join(bad)}; run python protos/generate.py", file=sys.stderr)
            return 1
        return 0
    for name, text in generate().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
