"""Fixtures shared by the merge tests: each merge path, by name."""

from __future__ import annotations

import pytest
from wire import c_required

from gossipfl.merge import MergeFn, c_merge, merge_numpy


@pytest.fixture(params=["numpy", "c"])
def merge_path(request: pytest.FixtureRequest) -> tuple[str, MergeFn]:
    """("numpy", reference) and ("c", kernel). The C case is skipped only where
    the kernel was not built and not required; see test_c_kernel_is_built."""
    if request.param == "numpy":
        return "numpy", merge_numpy
    merge = c_merge()
    if merge is None:
        if c_required():
            pytest.fail("the C merge kernel gossipfl._merge did not import")
        pytest.skip("C merge kernel not built (python setup.py build_ext --inplace)")
    return "c", merge
