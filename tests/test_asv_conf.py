"""asv.conf.json's environment matrix, read by asv's own parser.

asv turns each ``"req"`` entry into one ``pip install`` argument with its
``ParsedPipDeclaration``, which joins name and value with a space and reads a range it cannot
match as a pin: ``"tbb": [">=2021.6,<2024"]`` installed tbb==2021.6, whose thread pool made
fastce's threaded kernels run at one thread's speed in every benchmark process
(docs/performance.md, "tbb 2021.6 in asv's environment").
"""
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

asv_util = pytest.importorskip("asv.util", reason="asv is in the bench/test extras")


def _conf():
    text = "\n".join(l for l in (ROOT / "asv.conf.json").read_text().splitlines()
                     if not l.lstrip().startswith("//"))
    return json.loads(text)


def _pip_argument(name, value):
    """The requirement asv passes to ``pip install`` for one matrix entry."""
    decl = asv_util.ParsedPipDeclaration(f"{name} {value}")
    call = asv_util.construct_pip_call(lambda args: args, decl)
    return call()[-1]


@pytest.mark.parametrize("name,values", sorted(_conf()["matrix"]["req"].items()))
def test_matrix_requirement_reaches_pip_as_written(name, values):
    for value in values:
        assert _pip_argument(name, value) == name + value, (
            f"asv.conf.json matrix req {name!r}: {value!r} reaches pip as "
            f"{_pip_argument(name, value)!r}; write an exact pin (==X.Y.Z) or ''")


def test_parser_still_misreads_ranges():
    """The reason for the rule above: if asv learns to keep ranges, the pins may go."""
    assert _pip_argument("tbb", ">=2021.6,<2024") == "tbb==2021.6"


def test_benchmarked_tbb_satisfies_the_package_range():
    """The tbb the suite pins is one that fastce's own dependency range admits."""
    from packaging.requirements import Requirement
    pyproject = (ROOT / "pyproject.toml").read_text()
    line = next(l for l in pyproject.splitlines() if '"tbb' in l)
    req = Requirement(line.strip().strip(",").strip('"').split(";")[0])
    (pin,) = _conf()["matrix"]["req"]["tbb"]
    assert pin.startswith("==")
    assert req.specifier.contains(pin[2:]), (req, pin)
