"""Benchmarks are pytest-benchmark files named bench_<op>.py (see house style): collect them when pytest is given
this folder (`python -m pytest benchmarks`), not only when a file is named explicitly. The repository's conftest.py
(TRITON_INTERPRET=1 unless BLIP2FAST_GPU_TESTS=1) applies here too."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
