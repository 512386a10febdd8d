"""BackboneTask's hooks with Lightning's weight averaging (EMAWeightAveraging): validation runs the averaged weights
through the fused inference copy, checkpoints keep the averaged and the trained weights, resuming continues exactly."""

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL_HEADS
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tasks import ImageClassifier, ObjectDetector
from tasks.data import CocoDetectionDataModule

DECAY = 0.5  # far from 1, so that two steps leave the average well apart from the weights


def floating_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def hand_ema(states, decay=DECAY):
    """The exponential moving average of the weights after each step, started at the first (torch's AveragedModel
    copies the weights at its first update), as the formula goes: ``decay * average + (1 - decay) * weights``."""
    average = dict(states[0])
    for state in states[1:]:
        average = {k: decay * average[k] + (1 - decay) * state[k] for k in average}
    return average


class Weights(Callback):
    """The module's floating weights after every optimizer step, and as each validation epoch starts (listed after
    the averaging callback, whose hooks run first)."""

    def __init__(self):
        self.steps, self.validated = [], []

    def on_train_batch_end(self, trainer, module, *args):
        self.steps.append(floating_state(module))

    def on_validation_epoch_start(self, trainer, module):
        self.validated.append(floating_state(module))


def classifier():
    torch.manual_seed(0)
    return ImageClassifier(backbone="resnet18", num_classes=3, log_images=0, warmup_steps=0, lr_schedule="constant",
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9))


def tensors(n=4, shuffle=False):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 3)
    return DataLoader(data, batch_size=2, shuffle=shuffle)


def trainer(tmp_path, *callbacks, checkpoint=True, **kwargs):
    """A Trainer with the averaging callback, ``callbacks`` and, with ``checkpoint``, last.ckpt in ``tmp_path``."""
    saving = [ModelCheckpoint(dirpath=tmp_path, save_last="link")] if checkpoint else []  # one file per epoch
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=checkpoint,
                   callbacks=[EMAWeightAveraging(decay=DECAY), *callbacks, *saving], **kwargs)


def test_classifier_validates_on_the_averaged_weights_and_its_checkpoint_keeps_both(tmp_path):
    model, weights, loader = classifier(), Weights(), tensors()
    # the sanity check validates first, on the initial weights: the copy it makes must not be the one validation uses
    trainer(tmp_path, weights, max_epochs=1, num_sanity_val_steps=1).fit(model, loader, loader)
    average = hand_ema(weights.steps)
    assert len(weights.steps) == 2 and max((average[k] - weights.steps[-1][k]).abs().max() for k in average) > 1e-2
    for k in average:
        torch.testing.assert_close(weights.validated[-1][k], average[k], rtol=1e-5, atol=1e-6)
    # the logged validation loss is that of the averaged weights, computed here in plain eager mode
    images, labels = next(iter(DataLoader(loader.dataset, batch_size=4)))
    losses = {}
    for name, state in (("average", average), ("trained", weights.steps[-1])):
        reference = classifier()
        reference.load_state_dict(state, strict=False)
        with torch.no_grad():
            losses[name] = F.cross_entropy(reference.eval()(images), labels)
    # (two steps from scratch leave BatchNorm's running statistics far from the batches': large eval-mode losses)
    assert abs(losses["average"] - losses["trained"]) > 1e-2 * abs(losses["trained"]), losses
    torch.testing.assert_close(trainer_loss(model), losses["average"], rtol=1e-4, atol=1e-4)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for k in average:
        torch.testing.assert_close(checkpoint["state_dict"][k], average[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(checkpoint["current_model_state"][k], weights.steps[-1][k], rtol=0, atol=0)


def trainer_loss(model):
    return model.trainer.callback_metrics["val/loss"]


@pytest.mark.slow  # the classifier's test above proves the mechanism in CI; this one, the detector's wiring
def test_detector_validates_on_the_averaged_weights_and_its_checkpoint_keeps_both(tmp_path, tiny_coco):
    torch.manual_seed(0)
    model = ObjectDetector(backbone="resnet18", norm="bn", trainable_stages=5, min_size=64, max_size=64,
                           anchor_size=16, fpn_channels=32, detector_kwargs=SMALL_HEADS, warmup_steps=0,
                           lr_schedule="constant", log_images=0, num_classes=3,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9))
    data = CocoDetectionDataModule(**tiny_coco, batch_size=2, num_workers=0)
    weights = Weights()
    trainer(tmp_path, weights, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, data)
    average = hand_ema(weights.steps)
    assert max((average[k] - weights.steps[-1][k]).abs().max() for k in average) > 1e-3
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for k in average:
        torch.testing.assert_close(weights.validated[0][k], average[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(checkpoint["state_dict"][k], average[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(checkpoint["current_model_state"][k], weights.steps[-1][k], rtol=0, atol=0)
    assert "val/map" in model.trainer.callback_metrics


@pytest.mark.slow  # suite time: two fits; CI keeps the classifier's EMA validation and checkpoint test
def test_resuming_with_weight_averaging_continues_exactly(tmp_path):
    whole, whole_weights = classifier(), Weights()
    trainer(tmp_path, whole_weights, checkpoint=False, max_epochs=2, limit_val_batches=0).fit(whole, tensors())
    first = classifier()
    trainer(tmp_path / "parts", max_epochs=1, limit_val_batches=0).fit(first, tensors())
    resumed, resumed_weights = classifier(), Weights()
    trainer(tmp_path, resumed_weights, checkpoint=False, max_epochs=2, limit_val_batches=0).fit(
        resumed, tensors(), ckpt_path=tmp_path / "parts" / "last.ckpt")
    assert len(resumed_weights.steps) == 2  # the second epoch only
    for k, value in floating_state(whole).items():  # after fit: the averaged weights
        assert torch.equal(floating_state(resumed)[k], value), k
        assert torch.equal(resumed_weights.steps[-1][k], whole_weights.steps[-1][k]), k
    assert any(not torch.equal(floating_state(whole)[k], whole_weights.steps[-1][k]) for k in whole_weights.steps[-1])


def test_a_copy_of_the_task_shares_an_optimizer_factory_that_cannot_be_copied_and_copies_the_weights():
    # the command line's factory closes over the LightningCLI, whose data module holds a multiprocessing.Value
    # (DropEmptyMasks' counter), which deepcopy refuses: WeightAveraging's copy of the module failed on it
    import multiprocessing

    class Factory:  # as jsonargparse's: an object holding what it was made from
        def __init__(self):
            self.counter = multiprocessing.Value("l", 0)

        def __call__(self, params):
            return torch.optim.SGD(params, lr=0.1)

    factory = Factory()
    model = ImageClassifier(backbone="resnet18", num_classes=3, log_images=0, optimizer=factory)
    copied = torch.optim.swa_utils.AveragedModel(model).module
    assert copied.optimizer_factory is factory
    original, twin = dict(model.named_parameters()), dict(copied.named_parameters())
    assert original.keys() == twin.keys() and len(original) > 10
    for name, parameter in original.items():
        assert twin[name] is not parameter and twin[name].data_ptr() != parameter.data_ptr()
        torch.testing.assert_close(twin[name], parameter, rtol=0, atol=0)
    with torch.no_grad():
        next(iter(copied.parameters())).add_(1.0)
    assert not torch.equal(next(iter(copied.parameters())), next(iter(model.parameters())))
