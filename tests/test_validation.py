"""The config-validation helpers both applications' loaders use (moelab.validation)."""

from __future__ import annotations

import pytest

from moelab.errors import ConfigError
from moelab.validation import check_output, check_type, closest, did_you_mean, is_instance, type_name


def test_closest_and_did_you_mean():
    assert closest("num_expert", ["num_experts", "k_active"]) == "num_experts"
    assert closest("ethx", ["STEAD", "ETHZ"]) == "ETHZ"  # case-insensitive fallback keeps the real spelling
    assert closest("zzz", ["STEAD", "ETHZ"]) is None
    assert did_you_mean("cosin", ["constant", "cosine"]) == " (did you mean 'cosine'?)"
    assert did_you_mean("zzz", ["a"]) == ""


def test_types_and_booleans():
    assert type_name((int, float)) == "a number"
    assert type_name((str, type(None))) == "a string or null"
    assert is_instance(3, (int,)) and not is_instance(True, (int,)) and is_instance(True, (bool,))
    check_type("lr", 1e-3, (int, float))
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer \(traces per batch\), got true$"):
        check_type("batch_size", True, (int,), "traces per batch")
    with pytest.raises(ConfigError, match=r'^name must be a string or null, got \["a"\]$'):
        check_type("name", ["a"], (str, type(None)))


def test_check_output_refuses_unwritable_paths_before_any_work(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert check_output("--out", tmp_path / "new" / "grid.png") == tmp_path / "new" / "grid.png"
    assert check_output("--out", tmp_path / "d", folder=True) == tmp_path / "d"
    with pytest.raises(ConfigError, match=r"--json '.*d' is a folder: give the path of a file"):
        check_output("--json", tmp_path / "d")
    with pytest.raises(ConfigError, match=r"--out '.*f' is a file: give a folder to write into"):
        check_output("--out", tmp_path / "f", folder=True)
    with pytest.raises(ConfigError, match=r"--out '.*f/x/y' lies under '.*f', which is a file, not a folder"):
        check_output("--out", tmp_path / "f" / "x" / "y", folder=True)
