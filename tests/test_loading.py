"""ln.load (loading.py): a saved model reloaded into another architecture names the mismatch."""

from __future__ import annotations

import pytest
from conftest import Net, luz_net_setup, make_luz_data

import lanterna as ln


def test_load_with_a_different_architecture_names_the_mismatch(tmp_path):
    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=1, verbose=False)
    f.save(tmp_path / "m")
    with pytest.raises(Exception) as ei:
        ln.load(tmp_path / "m", module=Net(3, 8, 1))
    assert "net.0.weight" in str(ei.value)
