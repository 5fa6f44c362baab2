"""Interactions, losses and the learning-rate schedule against hand-computed values."""

import math

import pytest
import torch

from dlrm_torchrec.config import LRScheduleConfig
from dlrm_torchrec.model.dlrm import Loss
from dlrm_torchrec.model.interaction import Interaction, dot_interaction_pairs
from dlrm_torchrec.train.optim import lr_multiplier


def test_dot_pairs_follow_the_reference_lower_triangle_order():
    assert dot_interaction_pairs(4, False) == ([1, 2, 2, 3, 3, 3], [0, 0, 1, 0, 1, 2])
    assert dot_interaction_pairs(3, True) == ([0, 1, 1, 2, 2, 2], [0, 0, 1, 0, 1, 2])


def _inputs():
    x = torch.tensor([[1.0, 2.0]])                     # B=1, d=2
    e1, e2 = torch.tensor([[3.0, 0.5]]), torch.tensor([[-1.0, 4.0]])
    return x, torch.cat([e1, e2], dim=1)                # sparse: B x (F*d)


def test_dot_interaction_equals_hand_computed_values():
    x, sparse = _inputs()
    out = Interaction("dot", num_features=2, dim=2)(x, sparse)
    # Z(1,0)=x.e1=3+1=4, Z(2,0)=x.e2=-1+8=7, Z(2,1)=e1.e2=-3+2=-1
    assert out.tolist() == [[1.0, 2.0, 4.0, 7.0, -1.0]]


def test_dot_interaction_with_self_adds_the_diagonal_in_order():
    x, sparse = _inputs()
    out = Interaction("dot", num_features=2, dim=2, self_interaction=True)(x, sparse)
    # (0,0)=5, (1,0)=4, (1,1)=9.25, (2,0)=7, (2,1)=-1, (2,2)=17
    assert out.tolist() == [[1.0, 2.0, 5.0, 4.0, 9.25, 7.0, -1.0, 17.0]]


def test_cat_interaction_concatenates():
    x, sparse = _inputs()
    out = Interaction("cat", num_features=2, dim=2)(x, sparse)
    assert out.tolist() == [[1.0, 2.0, 3.0, 0.5, -1.0, 4.0]]


def test_dcn_interaction_is_a_low_rank_cross_net_over_the_concatenation():
    torch.manual_seed(0)
    x, sparse = _inputs()
    inter = Interaction("dcn", num_features=2, dim=2, dcn_num_layers=1, dcn_low_rank_dim=2)
    x0 = torch.cat([x, sparse], dim=1)
    cn = inter.crossnet
    w, v, b = cn.W_kernels[0], cn.V_kernels[0], cn.bias[0]
    expected = x0 * ((x0 @ v.T) @ w.T + b) + x0      # x_{l+1} = x_0 * (W (V x_l) + b) + x_l
    assert torch.allclose(inter(x, sparse), expected, atol=1e-6)
    assert inter.output_dim == 6


def test_losses_equal_hand_computed_values():
    logits = torch.tensor([0.0, math.log(3.0)])          # p = 0.5, 0.75
    labels = torch.tensor([1.0, 0.0])
    w = torch.ones(2)
    bce = (-math.log(0.5) - math.log(0.25)) / 2
    assert Loss("bce", [1, 1], False)(logits, labels, w).item() == pytest.approx(bce, rel=1e-6)
    mse = (0.25 + 0.5625) / 2
    assert Loss("mse", [1, 1], False)(logits, labels, w).item() == pytest.approx(mse, rel=1e-6)
    wbce = (3.0 * -math.log(0.5) + 0.5 * -math.log(0.25)) / 2   # w0=0.5 (label 0), w1=3
    assert Loss("wbce", [0.5, 3.0], False)(logits, labels, w).item() == pytest.approx(wbce, rel=1e-6)


def test_round_targets_rounds_labels_before_the_loss():
    logits, labels, w = torch.tensor([0.0]), torch.tensor([0.7]), torch.ones(1)
    assert Loss("mse", [1, 1], True)(logits, labels, w).item() == pytest.approx(0.25)


def test_padding_has_no_weight_and_tail_weights_give_the_mean_of_real_samples():
    logits = torch.tensor([0.0, math.log(3.0), 5.0, 5.0])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    weights = torch.tensor([2.0, 2.0, 0.0, 0.0])         # 2 real of 4: weight B / n = 2
    expected = (-math.log(0.5) - math.log(0.25)) / 2
    assert Loss("bce", [1, 1], False)(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)


def _schedule(w, s, n):
    return LRScheduleConfig(warmup_steps=w, decay_start_step=s, num_decay_steps=n)


def test_lr_warmup_is_linear():
    cfg = _schedule(4, 6, 4)
    assert [lr_multiplier(s, cfg) for s in (1, 2, 3)] == [0.25, 0.5, 0.75]


def test_lr_is_flat_at_the_last_warmup_value_until_decay():
    cfg = _schedule(4, 6, 4)
    assert lr_multiplier(4, cfg) == 0.75 and lr_multiplier(5, cfg) == 0.75


def test_lr_decays_quadratically_then_stays_at_the_last_value():
    cfg = _schedule(4, 6, 4)
    assert [lr_multiplier(s, cfg) for s in (6, 7, 8, 9)] == [1.0, 0.5625, 0.25, 0.0625]
    assert lr_multiplier(10, cfg) == 0.0625 and lr_multiplier(100, cfg) == 0.0625


def test_lr_without_decay_returns_to_base_after_warmup():
    cfg = _schedule(3, 0, 0)
    assert [lr_multiplier(s, cfg) for s in (1, 2, 3, 50)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0]


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_fused_dense_optimizer_steps_as_torchs_per_parameter_loop(name):
    """The fused (single-kernel; multi-tensor for Adagrad) dense optimizer the trainer uses
    on CUDA against torch's plain for-loop implementation, three steps with weight decay."""
    from dlrm_torchrec.config import OptimizerConfig
    from dlrm_torchrec.train.optim import dense_optimizer

    cfg = OptimizerConfig(dense=name, lr=0.1, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start = {"a.weight": torch.randn(5, 3, generator=g), "a.bias": torch.randn(5, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in start.items()} for _ in range(3)]
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    fused = dense_optimizer(cfg, params.items(), fused=True)
    mode = "foreach" if name == "adagrad" else "fused"  # fused Adagrad is CPU-only in some torch
    assert all(group[mode] for group in fused._optimizer.param_groups)
    ref_params = [torch.nn.Parameter(v.clone()) for v in start.values()]
    kw = {"lr": 0.1, "weight_decay": 0.01, "foreach": False}
    if name != "sgd":
        kw["eps"] = cfg.eps
    if name == "adam":
        kw["betas"] = (cfg.beta1, cfg.beta2)
    ref = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
           "adam": torch.optim.Adam}[name](ref_params, **kw)
    for step in grads:
        for (k, p), rp in zip(params.items(), ref_params):
            p.grad, rp.grad = step[k].clone(), step[k].clone()
        fused.step()
        ref.step()
    for p, rp in zip(params.values(), ref_params):
        torch.testing.assert_close(p.detach(), rp.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), start["a.weight"] if p.dim() == 2 else start["a.bias"])
