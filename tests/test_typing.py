"""Typed packaging: mypy passes on src/ (the [tool.mypy] config of pyproject.toml), lanterna ships ``py.typed`` so
a user's mypy reads its hints (``fit`` returns ``Fitted``, ``epochs="ten"`` is flagged), and other libraries'
``fit`` keywords (``batch_size=``, ``epoch=``, ``validation_data=``, ``lr=``) are refused with the lanterna way,
by mypy and at run time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lanterna as ln
from lanterna.errors import LanternaError, UnexpectedArgumentError

ROOT = Path(__file__).resolve().parents[1]
X, Y = torch.randn(16, 3), torch.randn(16, 1)


def mypy(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = getattr(request.config, "cache", None)  # .pytest_cache: reruns take seconds (absent: -p no:cacheprovider)
    return Path(store.mkdir("mypy")) if store is not None else tmp_path_factory.mktemp("mypy")


@pytest.mark.slow
def test_mypy_passes_on_src(cache):
    done = mypy([], cwd=ROOT, cache=cache)  # files, python_version, overrides: [tool.mypy] of pyproject.toml
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


@pytest.mark.slow
def test_a_users_mypy_reads_lanterna_types(tmp_path, cache):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import lanterna as ln

        x, y = torch.randn(8, 3), torch.randn(8, 1)
        setup = ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.AdamW, metrics=[ln.metrics.MAE()])
        fitted = setup.set_hparams(in_features=3, out_features=1).fit((x, y), epochs=2)
        reveal_type(fitted)
        reveal_type(fitted.fit((x, y), epochs=(1, 2)))
        setup.fit((x, y), epochs="ten")
        setup.fit((x, y), batch_size=64)
        fitted.fit((x, y), lr=0.1)
        ln.setup(nn.Linear, loss="mse")
        ln.setup(nn.Linear, optimizer=torch.optim.AdamW(nn.Linear(3, 1).parameters()))
    """))
    # run outside the repository, on the installed package: without py.typed mypy would not read lanterna at all
    done = mypy(["--python-version", "3.10", "--no-error-summary", str(script)], cwd=tmp_path, cache=cache)
    lines = [m.group(1) for m in re.finditer(r"^(?:.*/)?train\.py:\d+: (.*)$", done.stdout, re.M)]
    print(done.stdout, done.stderr)
    assert lines == [
        'note: Revealed type is "lanterna.results.Fitted"',
        'note: Revealed type is "lanterna.results.Fitted"',
        'error: Argument "epochs" to "fit" of "Setup" has incompatible type "str"; expected "int | tuple[int, int]"  '
        "[arg-type]",
        'error: Argument "batch_size" to "fit" of "Setup" has incompatible type "int"; expected "Never"  [arg-type]',
        'error: Argument "lr" to "fit" of "Fitted" has incompatible type "float"; expected "Never"  [arg-type]',
        'error: Argument "loss" to "setup" has incompatible type "str"; expected "Callable[[Any, Any], Tensor] | '
        'Sequence[Callable[[Any, Any], Tensor]] | Mapping[str, Callable[[Any, Any], Tensor]] | None"  [arg-type]',
        'error: Argument "optimizer" to "setup" has incompatible type "AdamW"; expected '
        '"type[Optimizer] | Callable[..., Optimizer] | None"  [arg-type]',
    ]


def test_the_package_ships_py_typed_license_and_an_honest_dependency_list():
    assert (ROOT / "src" / "lanterna" / "py.typed").is_file()
    assert "2026 the lanterna authors" in (ROOT / "LICENSE").read_text()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["lanterna"]
    project = meta["project"]
    assert not any(d.startswith("torchmetrics") for d in project["dependencies"])
    assert "torch>=2.6" in project["dependencies"]
    extras = project["optional-dependencies"]
    optional = ["torchmetrics", "pandas", "plot", "tensorboard", "optuna", "onnx", "mlflow", "wandb"]
    assert set(extras["all"]) == {req for name in optional for req in extras[name]}
    assert set(extras["all"]) <= set(extras["test"])
    assert "Typing :: Typed" in project["classifiers"]


def test_no_lanterna_module_imports_torchmetrics_at_top_level():
    # only inside functions that a torchmetrics object reached (the user imported it), or in docstrings
    for path in (ROOT / "src" / "lanterna").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.startswith(("import torchmetrics", "from torchmetrics")), path


def setup():
    return ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)


@pytest.mark.parametrize(("kwargs", "hint"), [
    ({"batch_size": 64}, 'dataloader_options={"batch_size": 64}'),
    ({"epoch": 3}, "use epochs="),
    ({"validation_data": (X, Y)}, "use valid_data="),
    ({"lr": 0.1}, r"ln.setup(...).set_opt_hparams(lr=0.1)"),
    ({"validation_split": 0.2}, "valid_data=0.2"),
    ({"seeed": 1}, "did you mean seed="),
])
@pytest.mark.parametrize("fitted", [False, True], ids=["Setup.fit", "Fitted.fit"])
def test_another_librarys_fit_keyword_is_refused_with_the_lanterna_way(kwargs, hint, fitted):
    s = setup()
    target = s.fit((X, Y), epochs=1, verbose=False) if fitted else s
    before = [p.detach().clone() for p in target.model.parameters()] if fitted else None
    with pytest.raises(UnexpectedArgumentError) as info:
        target.fit((X, Y), verbose=False, **kwargs)
    message = str(info.value)
    assert message.startswith(f"fit() got an unexpected keyword argument {next(iter(kwargs))!r}: ")
    assert hint in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, LanternaError)
    if fitted:  # refused before anything trains
        assert all(torch.equal(a, b) for a, b in zip(before, target.model.parameters()))
        assert len(target.history) == 1


def test_several_unknown_keywords_are_all_named_and_an_unknown_one_lists_what_fit_takes():
    with pytest.raises(UnexpectedArgumentError) as info:
        setup().fit((X, Y), zzz=1, shuffle=False)
    assert str(info.value) == (
        "fit() got an unexpected keyword argument 'zzz': it takes data, epochs, valid_data, callbacks, verbose, "
        "accelerator, dataloader_options, seed, sample_weight. "
        "fit() got an unexpected keyword argument 'shuffle': pass dataloader_options={\"shuffle\": False}."
    )
    assert info.value.names == ["zzz", "shuffle"]
