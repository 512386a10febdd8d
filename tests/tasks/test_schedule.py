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


def mmengine_poly_lr(base: float, eta_min: float, power: float, end: int) -> list:
    """The learning rate of each step 0..end-1 by mmengine's PolyLR in its chained form (begin 0, total_iters end - 1):
    lr_t = (lr_(t-1) - eta_min) * (1 - 1 / (total_iters - t + 1)) ** power + eta_min."""
    total_iters, lrs = end - 1, [base]
    for t in range(1, end):
        lrs.append((lrs[-1] - eta_min) * (1 - 1 / (total_iters - t + 1)) ** power + eta_min)
    return lrs


def test_poly_is_mmsegmentations_poly_lr_down_to_its_floor():
    # schedule_160k's numbers (lr 0.01, eta_min 1e-4, power 0.9), on 200 steps
    f = lr_factor("poly", total_steps=200, warmup_steps=0, min_factor=1e-4 / 0.01)
    expected = mmengine_poly_lr(0.01, 1e-4, 0.9, 200)
    assert [0.01 * f(t) for t in range(200)] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.01 * f(199) == pytest.approx(1e-4) and 0.01 * f(250) == pytest.approx(1e-4)  # the floor, and after


def test_poly_after_warmup_decays_over_the_remaining_steps():
    f = lr_factor("poly", total_steps=110, warmup_steps=10)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)  # the warmup as the other schedules
    assert [f(10 + t) for t in range(100)] == pytest.approx(mmengine_poly_lr(1.0, 0.0, 0.9, 100), abs=1e-12)


def test_bad_schedule_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"choose one of \['multistep', 'cosine', 'poly', 'constant'\]"):
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


def test_a_task_with_poly_decays_every_parameter_group_from_its_own_lr_to_min_lr():
    from types import SimpleNamespace

    import torch

    from tasks import SemanticSegmenter

    def two_groups(params):  # e.g. a trunk at a tenth of the head's lr: each group reaches the same floor
        params = list(params)
        return torch.optim.SGD([{"params": params[:5], "lr": 0.001}, {"params": params[5:]}], lr=0.01)

    model = SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32,
                              optimizer=two_groups, lr_schedule="poly", min_lr=1e-4)
    model._trainer = SimpleNamespace(estimated_stepping_batches=200)  # the length, as a Trainer gives it
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    for lr, factor in zip([0.001, 0.01], scheduler.lr_lambdas, strict=True):
        expected = mmengine_poly_lr(lr, 1e-4, 0.9, 200)
        assert [lr * factor(t) for t in range(200)] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match=r"model.min_lr=0.05 is above the optimizer's lr=0.001"):
        SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32,
                          optimizer=two_groups, lr_schedule="poly", min_lr=0.05).configure_optimizers()
    with pytest.raises(ValueError, match=r"model.min_lr=0.0001: the floor of lr_schedule: poly"):
        SemanticSegmenter(head="fpn", backbone="resnet18", num_classes=3, lr_schedule="cosine", min_lr=1e-4)
