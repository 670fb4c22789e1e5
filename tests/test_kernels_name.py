"""Our top-level `kernels/` folder and the PyPI package `kernels` never hide or break each other.

transformers (>= 5.2x) depends on the PyPI `kernels` and probes for it on every `from_pretrained` and `model.train()`.
Python started in the repository root finds our Triton folder first under that name. Each case runs in a fresh
interpreter over a copy of this environment's site-packages (symlinks) in which the PyPI package is either absent or
installed: the real one where this environment has it (transformers >= 5.2x depends on it and imports its names),
else a stand-in with the version transformers asks for; so both states are tested whatever this venv has installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import importlib.metadata

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN_VERSION = "0.19.1"  # inside transformers' accepted range for the PyPI package

# What the child does: import in the given order, load a tiny transformers model through blip2fast's loader (the
# call that failed), switch it to training mode (transformers probes `kernels` there), import blip2fast.kernels,
# then report what `import kernels` gives.
CHILD = textwrap.dedent(
    """
    import json, os, site, sys
    site.addsitedir(os.environ["FARM"])          # the copied site-packages, .pth files (editable install) included
    order = os.environ["ORDER"].split(",")
    for name in order:
        __import__(name)
    from transformers import BertConfig, BertModel
    from blip2fast._hf import load_pretrained
    folder = os.environ["MODEL_DIR"]
    BertModel(BertConfig(vocab_size=61, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=40, max_position_embeddings=16)).save_pretrained(folder)
    model = load_pretrained(BertModel, folder)
    model.train()
    import blip2fast.kernels, blip2fast.kernels.itc_loss
    report = {"blip2fast_kernels": blip2fast.kernels.__file__, "use_kernels": bool(model.use_kernels)}
    try:
        import kernels
        report["kernels_version"] = getattr(kernels, "__version__", None)
        report["kernels_file"] = getattr(kernels, "__file__", None)
        try:
            from kernels import Mode
            report["mode"] = repr(Mode)
        except ImportError as e:
            report["from_import_error"] = str(e)
    except ImportError as e:
        report["import_error"] = str(e)
    print("REPORT" + json.dumps(report))
    """
)


def _installed_kernels_version():
    """The PyPI `kernels` version installed in this environment, or None."""
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def _site_farm(tmp_path, installed: bool) -> tuple:
    """(folder, expected `kernels.__version__`): symlinks to this environment's site-packages, with the PyPI
    `kernels` (dist-info included) left out when not `installed`; when `installed` and this environment has none, a
    stand-in package with proper metadata takes its place."""
    real = _installed_kernels_version()
    keep_real = installed and real is not None
    farm = tmp_path / "site"
    farm.mkdir()
    for lib in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in os.listdir(lib):
            low = entry.lower()
            is_kernels = low == "kernels" or (low.startswith("kernels-") and low.endswith((".dist-info", ".egg-info")))
            if is_kernels and not keep_real:
                continue
            if not (farm / entry).exists():
                os.symlink(os.path.join(lib, entry), farm / entry)
    if keep_real:
        return str(farm), real
    if installed:
        pkg = farm / "kernels"
        pkg.mkdir()
        (pkg / "__init__.py").write_text(f'__version__ = "{STANDIN_VERSION}"\nMode = "standin-mode"\n')
        meta = farm / f"kernels-{STANDIN_VERSION}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {STANDIN_VERSION}\n")
        (meta / "RECORD").write_text("")
        (meta / "top_level.txt").write_text("kernels\n")
        return str(farm), STANDIN_VERSION
    return str(farm), None


@pytest.mark.slow
@pytest.mark.parametrize("order", ["transformers,blip2fast", "blip2fast,transformers"])
@pytest.mark.parametrize("pypi_kernels", ["installed", "absent"])
@pytest.mark.parametrize("cwd", ["repo_root", "elsewhere"])
def test_kernels_folder_and_pypi_kernels_coexist(tmp_path, cwd, pypi_kernels, order):
    farm, version = _site_farm(tmp_path, installed=pypi_kernels == "installed")
    workdir = REPO if cwd == "repo_root" else str(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(FARM=farm, ORDER=order, MODEL_DIR=str(tmp_path / "bert"), HF_HUB_OFFLINE="1")
    # -S: no site-packages but the farm's (added by the child), so the venv's own `kernels` cannot leak in.
    proc = subprocess.run([sys.executable, "-S", "-c", CHILD], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"child failed (cwd={cwd}, kernels {pypi_kernels}, {order}):\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")]
    assert line, proc.stdout[-2000:]
    report = json.loads(line[-1][len("REPORT"):])

    # Our kernels always import as blip2fast.kernels, from the repository's folder.
    assert os.path.samefile(os.path.dirname(report["blip2fast_kernels"]), os.path.join(REPO, "kernels"))
    # The model was loaded with hub kernels off, whatever the transformers version.
    assert report["use_kernels"] is False
    if pypi_kernels == "installed":
        # The PyPI package, never our folder, answers to `import kernels`.
        assert report["kernels_version"] == version
        assert "mode" in report, report
        assert os.path.samefile(report["kernels_file"], os.path.join(farm, "kernels", "__init__.py"))
    else:
        # Absent stays absent: nothing of our folder is offered under the PyPI name.
        assert report.get("kernels_version") is None and report.get("kernels_file") is None
        assert "mode" not in report
        message = report.get("import_error") or report.get("from_import_error")
        assert message and ("Mode" in message or "kernels" in message)


def test_kernels_folder_refuses_to_pose_as_its_own_package():
    """Imported under any other name than blip2fast.kernels, the folder's contents are never exposed."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kernels\n"
        "assert not hasattr(kernels, 'itc_loss')\n"
        "try:\n    import kernels.itc_loss\nexcept ImportError:\n    print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-c", code, REPO], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
