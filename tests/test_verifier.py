"""Tests for verifier.py: boxed-answer extraction and the math outcome reward."""

import threading
import time

import pytest

import verifier
from math_verify.errors import TimeoutException
from verifier import extract_boxed, math_reward, math_reward_with_reason


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left(\frac{a}{b}, c^{2}\right)}", r"\left(\frac{a}{b}, c^{2}\right)"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped set braces are not groups
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # ... even when unpaired
        (r"first \boxed{1}, finally \boxed{2}", "2"),  # last box wins
        (r"\boxed{1} then \fbox{3}", "3"),
        (r"\fbox{3} then \boxed {4}", "4"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{1} but then \boxed{\frac{1}{2}", None),  # truncated final box: no fallback
        (r"\boxed{1}}", "1"),
        (r"\boxed 5", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_deep_and_long():
    deep = "{" * 1000 + "x" + "}" * 1000
    assert extract_boxed(r"\boxed{" + deep + "}") == deep
    t = time.perf_counter()
    assert extract_boxed(r"\boxed{" + "{" * 200_000) is None
    assert extract_boxed("a " * 100_000 + r"\boxed{7}") == "7"
    assert time.perf_counter() - t < 1.0


CASES = [
    # (response, ground_truth, expected reward)
    (r"The answer is \boxed{42}.", "42", 1.0),
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{7}", "-7", 0.0),
    (r"\boxed{41}", "42", 0.0),
    (r"\boxed{007}", "7", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{11.99}", "12", 0.0),
    (r"\boxed{12.0}", "12", 1.0),
    (r"\boxed{\frac{24}{2}}", "12", 1.0),
    (r"\boxed{(2,1)}", "(1,2)", 0.0),
    (r"\boxed{[0,1]}", "[0,1)", 0.0),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),  # sets are unordered
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{5 \text{ cm}}", "5", 1.0),
    (r"\boxed{-\infty}", r"\infty", 0.0),
    (r"\fbox{8}", "8", 1.0),
    (r"\boxed{1 \text{ or } 5}", "5", 0.0),  # hedging between candidates earns nothing
    (r"first \boxed{3}, corrected: \boxed{5}", "5", 1.0),
    (r"first \boxed{5}, corrected: \boxed{3}", "5", 0.0),
]


@pytest.mark.parametrize("response, ground_truth, expected", CASES)
def test_math_reward(response, ground_truth, expected):
    assert math_reward(response, ground_truth) == expected


def test_no_box_scores_zero():
    assert math_reward_with_reason("The answer is 5.", "5") == (0.0, "no_answer")
    assert math_reward_with_reason(r"\boxed{ }", "5") == (0.0, "no_answer")


def test_reasons():
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (1.0, "ok")
    assert math_reward_with_reason(r"\boxed{0.6}", r"\frac12") == (0.0, "wrong")


def test_checker_exception_scores_zero(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("checker crashed")

    monkeypatch.setattr(verifier, "verify", boom)
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (0.0, "error")


def test_checker_timeout_scores_zero(monkeypatch):
    def slow(*args, **kwargs):
        raise TimeoutException("Operation timed out!")  # what math-verify's alarm handler raises

    monkeypatch.setattr(verifier, "verify", slow)
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (0.0, "timeout")


def test_long_response_returns_quickly():
    t = time.perf_counter()
    assert math_reward("word " * 40_000 + r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    # A 200k-character pathological answer: math-verify's real timeout stops it.
    nested = "(" * 100_000 + "1" + ")" * 100_000
    assert math_reward_with_reason(r"\boxed{" + nested + "}", "1") == (0.0, "timeout")
    assert time.perf_counter() - t < 3 * verifier.TIMEOUT_S


def test_thread_is_refused():
    errors = []

    def call():
        try:
            math_reward(r"\boxed{1}", "1")
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
