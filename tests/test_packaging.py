"""Packaging checks: what an installed vlmserve looks like from outside the repository.

Our attention package is a top-level ``kernels``, the same import name as Hugging Face's kernel
hub package (PyPI ``kernels``) that transformers probes for with ``is_kernels_available()``. That
probe first asks ``importlib.metadata.version("kernels")``, then the distributions that
``packages_distributions()`` maps ``kernels`` to, and only as a last resort imports the package.
An install of vlmserve (editable included) ships ``top_level.txt`` naming engine, kernels and
runtime, so the map says ``kernels -> vlmserve`` and transformers reads vlmserve's version
instead of importing our package. Without any install (only ``PYTHONPATH`` pointing at the repo)
transformers does import our ``kernels``; its ``__version__`` is then what keeps the probe False.

The subprocesses run with cwd in a temporary folder and without PYTHONPATH, so the repository
root is not on ``sys.path`` and they see exactly what the installed environment provides.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


_INSTALLED_PROBE = """
import importlib.metadata as md, importlib.util as u
try:
    md.distribution("vlmserve")
except md.PackageNotFoundError:
    print("not-installed")
else:
    spec = u.find_spec("kernels")
    print(spec.origin if spec is not None and spec.origin else "no-kernels")
"""


def _require_installed_here(cwd: Path) -> None:
    """Skip unless vlmserve is installed (scripts/test.sh installs it editable) from this checkout.

    Asked in a subprocess from ``cwd`` (not the repo root): in-process, a ``vlmserve.egg-info``
    left in the repo root would pass for an installation.
    """
    probe = subprocess.run([sys.executable, "-c", _INSTALLED_PROBE], cwd=cwd, env=_clean_env(),
                           capture_output=True, text=True, timeout=120)
    found = probe.stdout.strip()
    if probe.returncode != 0:
        pytest.fail(f"probing the installation failed: {probe.stderr[-2000:]}")
    if found == "not-installed":
        pytest.skip("vlmserve is not installed in this environment; run the suite via scripts/test.sh")
    if found == "no-kernels" or not Path(found).resolve().is_relative_to(REPO_ROOT):
        pytest.skip(f"the installed vlmserve is not this checkout (kernels: {found})")


def _kernels_range() -> tuple[Version, Version]:
    from transformers.utils import import_utils

    return Version(import_utils.KERNELS_MIN_VERSION), Version(import_utils.KERNELS_MAX_VERSION)


_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import importlib.metadata as md
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import import_utils

    repo = os.path.realpath(sys.argv[1])
    res = {"repo_on_sys_path": any(os.path.realpath(p or os.getcwd()) == repo for p in sys.path)}
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    res["new_tokens"] = out.shape[1] - ids.shape[1]
    res["kernels_imported_after_generate"] = "kernels" in sys.modules
    res["is_kernels_available"] = import_utils.is_kernels_available()
    res["kernels_imported_after_probe"] = "kernels" in sys.modules
    res["kernels_distributions"] = md.packages_distributions().get("kernels")
    print(json.dumps(res))
    """
)


def test_transformers_does_not_take_our_kernels_for_the_hub_package(tmp_path, tiny_qwen2):
    _require_installed_here(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(REPO_ROOT), str(tiny_qwen2)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not res["repo_on_sys_path"], "the probe must see the installed package, not the repo root"
    assert res["new_tokens"] == 4
    why = f"packages_distributions()['kernels'] = {res['kernels_distributions']!r}"
    assert res["is_kernels_available"] is False, why
    assert not res["kernels_imported_after_generate"], f"transformers imported our kernels package; {why}"
    assert not res["kernels_imported_after_probe"], f"is_kernels_available() imported our kernels; {why}"


def test_vlmserve_generate_console_script(tmp_path, tiny_qwen2):
    _require_installed_here(tmp_path)
    exe = shutil.which("vlmserve", path=str(Path(sys.executable).parent)) or shutil.which("vlmserve")
    assert exe, "the vlmserve console script is not installed"
    proc = subprocess.run(
        [exe, "generate", str(tiny_qwen2), "--prompt", "hi", "--max-tokens", "8", "--device", "cpu"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert "Prompt: 'hi'" in lines, proc.stdout
    outputs = [line for line in lines if line.startswith("Output: ")]
    assert len(outputs) == 1, proc.stdout
    assert len(outputs[0]) > len("Output: ''"), f"no text generated: {proc.stdout}"


def test_our_kernels_versions_are_outside_the_hub_kernels_range():
    lo, hi = _kernels_range()
    import kernels

    assert kernels.__file__ and Path(kernels.__file__).resolve().is_relative_to(REPO_ROOT)
    ours = Version(kernels.__version__)
    assert not (lo <= ours < hi), f"kernels.__version__ {ours} lies in transformers' range [{lo}, {hi})"
    # In an installed environment transformers reads the version of the distribution that ships
    # the top-level ``kernels`` (vlmserve) without importing it: that one must stay outside too.
    try:
        dist = Version(importlib.metadata.version("vlmserve"))
    except importlib.metadata.PackageNotFoundError:
        return
    assert not (lo <= dist < hi), f"vlmserve's version {dist} lies in transformers' kernels range [{lo}, {hi})"


def test_demo_model_is_built_once_and_reused(tmp_path):
    from runtime.demo_model import ensure_demo_model

    target = tmp_path / "demo"
    first = ensure_demo_model(target)
    assert first == target.absolute()
    assert (first / "config.json").exists() and (first / "model.safetensors").exists()
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert ensure_demo_model(target) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folders left behind


def test_demo_model_never_reuses_or_clobbers_a_foreign_folder(tmp_path, monkeypatch):
    from runtime.demo_model import default_demo_dir, ensure_demo_model

    monkeypatch.setenv("VLMSERVE_DEMO_DIR", str(tmp_path / "env-demo"))
    assert default_demo_dir() == tmp_path / "env-demo"
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")  # e.g. someone else's folder, or a partial copy
    with pytest.raises(ValueError, match="not a vlmserve demo build"):
        ensure_demo_model(half)
    assert [p.name for p in half.iterdir()] == ["config.json"]
