"""The API reference (docs/api.rst, built from the docstrings) stays true and complete.

- every ``>>>`` example in the docstrings of the public names (``gradvac_dist.__all__``, their
  methods and properties) runs and prints what it shows;
- every public function and class says what it takes (``Args:``), what it returns
  (``Returns:``, for functions that return something) and shows itself (``Example:``), and every
  public method or property has at least a one-line summary;
- docs/api.rst documents every public name.

The examples build their tensors in float64 explicitly, so they do not depend on
``GRADVAC_TEST_DTYPE``.
"""

from __future__ import annotations

import doctest
import inspect
import pathlib
import re

import pytest
import torch

import gradvac_dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
PUBLIC = sorted(gradvac_dist.__all__)
#: at least this many ``>>>`` examples must run: the test cannot pass by finding none
MIN_EXAMPLES = 100
#: names whose examples need several processes: shown as code, not run
MULTI_PROCESS = {"gradvac_hook", "register_ddp", "register_fsdp", "FSDPGradVac"}


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    tests: dict[str, doctest.DocTest] = {}
    for name in PUBLIC:
        obj = getattr(gradvac_dist, name)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue  # a constant: its docstring is its type's
        for test in finder.find(obj, f"gradvac_dist.{name}"):  # in the defining module's namespace
            if test.examples:
                tests.setdefault(test.name, test)
    return sorted(tests.values(), key=lambda t: t.name)


DOCTESTS = _doctests()


def _run(test: doctest.DocTest) -> tuple[doctest.TestResults, str]:
    """Runs one docstring's examples (``...`` matches anything in an output); the result and
    doctest's report of the failures."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with torch.random.fork_rng(devices=[]):  # leave the global generator as the suite left it
        result = runner.run(test, out=report.append, clear_globs=True)
    return result, "".join(report)


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name)
def test_docstring_examples(test):
    result, report = _run(test)
    assert result.failed == 0, report
    assert result.attempted == len(test.examples)


def test_enough_examples_run():
    attempted = sum(_run(test)[0].attempted for test in DOCTESTS)
    assert attempted >= MIN_EXAMPLES, f"only {attempted} docstring examples ran, in {[t.name for t in DOCTESTS]}"
    named = {t.name.split(".")[1] for t in DOCTESTS}
    single = {n for n in PUBLIC if callable(getattr(gradvac_dist, n))} - MULTI_PROCESS
    assert single <= named, f"public names without a doctest: {sorted(single - named)}"


def test_a_wrong_output_fails():
    wrong = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "wrong", None, 0)
    result, report = _run(wrong)
    assert (result.failed, result.attempted) == (1, 1) and "Expected:" in report


def _returns_something(func) -> bool:
    """Whether ``func``'s return annotation says it returns something (not ``None``)."""
    ret = inspect.signature(func, eval_str=False).return_annotation
    return ret not in (None, "None", inspect.Signature.empty)


def _sections(doc: str) -> set[str]:
    return set(re.findall(r"^(Args|Returns|Raises|Example|Examples|Attributes):\s*$", doc, re.MULTILINE))


def _missing_sections(obj) -> list[str]:
    """The sections a public function's or class's docstring lacks."""
    doc = inspect.getdoc(obj) or ""
    lines = doc.strip().splitlines()
    if not lines or not lines[0].strip():
        return ["a one-line summary"]
    sections = _sections(doc)
    missing = []
    if inspect.signature(obj).parameters and "Args" not in sections:
        missing.append("Args:")
    if not inspect.isclass(obj) and _returns_something(obj) and "Returns" not in sections:
        missing.append("Returns:")
    if not sections & {"Example", "Examples"}:
        missing.append("Example:")
    return missing


@pytest.mark.parametrize("name", [n for n in PUBLIC if callable(getattr(gradvac_dist, n))])
def test_public_docstring_sections(name):
    missing = _missing_sections(getattr(gradvac_dist, name))
    assert not missing, f"gradvac_dist.{name}'s docstring lacks {missing}"


def _public_members() -> list[tuple[str, str]]:
    """(class, member) for the public methods and properties the public classes define."""
    out = []
    for name in PUBLIC:
        cls = getattr(gradvac_dist, name)
        if not inspect.isclass(cls) or issubclass(cls, (BaseException, tuple)):
            continue  # an exception's and a named tuple's members are Python's
        for member, value in vars(cls).items():
            if (member == "__call__" or not member.startswith("_")) and (
                inspect.isfunction(value) or isinstance(value, property)
            ):
                out.append((name, member))
    return out


@pytest.mark.parametrize("member", _public_members(), ids=".".join)
def test_public_members_have_a_summary(member):
    cls_name, name = member
    doc = inspect.getdoc(getattr(getattr(gradvac_dist, cls_name), name)) or ""
    assert doc.strip(), f"gradvac_dist.{cls_name}.{name} has no docstring"


def test_api_page_lists_every_public_name():
    page = (ROOT / "docs" / "api.rst").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. auto(?:class|function|data|exception):: (\w+)\s*$", page, re.MULTILINE))
    assert documented == set(PUBLIC), {
        "not in docs/api.rst": sorted(set(PUBLIC) - documented),
        "in docs/api.rst but not public": sorted(documented - set(PUBLIC)),
    }


def test_the_section_check_finds_what_is_missing():
    def bare(x: int) -> int:
        """Doubles."""
        return 2 * x

    def complete(x: int) -> None:
        """Does nothing.

        Args:
            x: ignored.

        Example:
            >>> complete(1)
        """

    assert _missing_sections(bare) == ["Args:", "Returns:", "Example:"]
    assert _missing_sections(complete) == []
