import math

import pytest

from tasks.schedule import lr_factor


def test_lr_factor_multistep_is_the_detection_1x_schedule():
    f = lr_factor("multistep", total_steps=1200, warmup_steps=100, milestones=[8 / 12, 11 / 12])
    assert f(0) == pytest.approx(0.001) and f(50) == pytest.approx(0.5005) and f(100) == 1.0
    assert f(799) == 1.0 and f(800) == pytest.approx(0.1) and f(1100) == pytest.approx(0.01)


def test_cosine_decays_to_zero_after_warmup():
    f = lr_factor("cosine", total_steps=110, warmup_steps=10)
    assert f(10) == 1.0 and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_bad_schedule_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"choose one of \['multistep', 'cosine', 'constant'\]"):
        lr_factor("step", total_steps=1, warmup_steps=0)
    with pytest.raises(ValueError, match="fractions of training"):
        lr_factor("multistep", total_steps=1, warmup_steps=0, milestones=[8, 11])


def test_a_schedule_length_given_as_a_function_is_asked_once_and_never_at_step_0():
    asked = []

    def count() -> int:
        asked.append(1)
        return 1200

    f = lr_factor("multistep", total_steps=count, warmup_steps=100, milestones=[8 / 12, 11 / 12])
    assert f(0) == pytest.approx(0.001) and not asked  # LambdaLR asks for step 0 before the data is loaded
    assert f(800) == pytest.approx(0.1) and f(50) == pytest.approx(0.5005) and len(asked) == 1
