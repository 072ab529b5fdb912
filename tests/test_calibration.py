import numpy as np
import torch

from potluck.calibration import expected_calibration_error, fit_temperature, fold_temperature, softmax


def _sampled(n=4000, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, classes)) * 2
    probs = softmax(true_logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return true_logits, labels


def test_fit_temperature_recovers_a_known_overconfidence():
    logits, labels = _sampled()
    assert abs(fit_temperature(logits * 3.0, labels) - 3.0) < 0.3
    assert abs(fit_temperature(logits, labels) - 1.0) < 0.1


def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    logits, labels = _sampled()
    over = logits * 3.0
    t = fit_temperature(over, labels)
    assert expected_calibration_error(softmax(over, t), labels) < expected_calibration_error(softmax(over), labels) / 2


def test_small_perfect_validation_does_not_claim_certainty():
    logits = np.array([[2.0, -2.0], [-2.0, 2.0]] * 20)
    labels = np.array([0, 1] * 20)
    assert fit_temperature(logits, labels) > 0.2


def test_ece_of_known_predictions():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # bin 0.9: accuracy 0.5, confidence 0.9; bin 0.6: accuracy 1.0, confidence 0.6
    assert abs(expected_calibration_error(probs, labels) - (0.5 * 0.4 + 0.5 * 0.4)) < 1e-9


def test_fold_temperature_divides_the_head():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 3)

    model = Model()
    x = torch.randn(5, 4)
    before = model.classifier(x).detach().numpy()
    fold_temperature(model, 2.5)
    after = model.classifier(x).detach().numpy()
    np.testing.assert_allclose(softmax(after), softmax(before, 2.5), atol=1e-6)
