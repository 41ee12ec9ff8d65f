"""Bad input to a public op: a one-line error that names the argument and what was expected."""

import pytest
import torch

from pyllm import ops


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


q4, kv4 = t(2, 4, 5, 8), t(2, 2, 5, 8)
ids = torch.zeros(2, 5, dtype=torch.long)

CASES = {
    "attention q rank": (lambda: ops.attention(t(4, 5, 8), kv4, kv4), ValueError, "'q' must have 4 dims"),
    "attention k dtype": (lambda: ops.attention(q4, kv4.double(), kv4), TypeError,
                          "'k' has dtype float64, expected float32 \\(the dtype of 'q'\\)"),
    "attention v device": (lambda: ops.attention(q4, kv4, t(2, 2, 5, 8, device="meta")), ValueError,
                           "'v' is on meta, expected cpu"),
    "attention kv shape": (lambda: ops.attention(q4, t(2, 2, 5, 4), t(2, 2, 5, 4)), ValueError,
                           r"must be \(B=2, Hkv, S, D=8\)"),
    "attention heads": (lambda: ops.attention(t(2, 3, 5, 8), kv4, kv4), ValueError,
                        "query heads 3 must be a multiple of key/value heads 2"),
    "attention T > S": (lambda: ops.attention(t(2, 4, 6, 8), kv4, kv4), ValueError, "q has 6 positions but k/v only 5"),
    # both raised ZeroDivisionError (Hq % Hkv; the default scale 1/sqrt(D))
    "attention no kv heads": (lambda: ops.attention(q4, t(2, 0, 5, 8), t(2, 0, 5, 8)), ValueError,
                              "k and v have 0 heads, need at least 1"),
    "attention head dim 0": (lambda: ops.attention(t(2, 4, 5, 0), t(2, 2, 5, 0), t(2, 2, 5, 0)), ValueError,
                             "head dim D=0, need at least 1"),
    "attention doc_ids dtype": (lambda: ops.attention(q4, kv4, kv4, doc_ids=ids.float()), TypeError,
                                "'doc_ids' has dtype float32, expected one of int32, int64"),
    "attention doc_ids shape": (lambda: ops.attention(q4, kv4, kv4, doc_ids=ids[:, :4]), ValueError,
                                r"'doc_ids' has shape \(2, 4\), expected \(2, 5\)"),
    "attention window": (lambda: ops.attention(q4, kv4, kv4, window=0), ValueError, "'window'=0 must be >= 1"),
    "layer_norm weight": (lambda: ops.layer_norm(t(3, 8), t(7)), ValueError, r"'weight' has shape \(7,\), expected \(8,\)"),
    "layer_norm int x": (lambda: ops.layer_norm(t(3, 8, dtype=torch.int64), t(8)), TypeError, "'x' has dtype int64"),
    "layer_norm residual": (lambda: ops.layer_norm(t(3, 8), t(8), residual=t(2, 8)), ValueError, "'residual' has shape"),
    "rms_norm not a tensor": (lambda: ops.rms_norm([1.0, 2.0], t(2)), TypeError, "'x' must be a torch.Tensor, got list"),
    "bias_gelu approximate": (lambda: ops.bias_gelu(t(3), approximate="fast"), ValueError,
                              r"'approximate'='fast' is not one of \['tanh', 'none'\]"),
    "bias_gelu bias": (lambda: ops.bias_gelu(t(2, 3), t(4)), ValueError, "'bias' has shape"),
    "swiglu up": (lambda: ops.swiglu(t(2, 3), t(2, 4)), ValueError, "'up' has shape"),
    "rope odd dim": (lambda: ops.rope(t(1, 2, 3, 5), t(1, 2, 3, 5), t(3, 2), t(3, 2)), ValueError,
                     "head dim 5 must be even"),
    "rope cos": (lambda: ops.rope(t(1, 2, 3, 4), t(1, 2, 3, 4), t(4, 2), t(4, 2)), ValueError,
                 r"'cos' has shape \(4, 2\), expected \(3, 2\)"),
    "matmul inner": (lambda: ops.matmul(t(2, 3), t(4, 5)), ValueError, "inner dims differ"),
    "matmul dtype": (lambda: ops.matmul(t(2, 3), t(3, 5, dtype=torch.float16)), TypeError, "'b' has dtype"),
    "linear weight": (lambda: ops.linear(t(2, 3), t(4, 5)), ValueError, r"weight \(4, 5\) must be \(N, K=3\)"),
    "linear activation": (lambda: ops.linear(t(2, 3), t(4, 3), activation="relu"), ValueError, "'activation'='relu'"),
    "cross_entropy target dtype": (lambda: ops.cross_entropy(t(4, 10), t(4)), TypeError, "'target' has dtype float32"),
    "cross_entropy target shape": (lambda: ops.cross_entropy(t(4, 10), ids), ValueError,
                                   r"'target' has shape \(2, 5\), expected \(4,\)"),
    "cross_entropy smoothing": (lambda: ops.cross_entropy(t(2, 5), ids[0, :2], label_smoothing=1.0), ValueError,
                                r"'label_smoothing'=1.0 must be in \[0, 1\)"),
    "cross_entropy reduction": (lambda: ops.cross_entropy(t(2, 5), ids[0, :2], reduction="avg"), ValueError,
                                "'reduction'='avg'"),
    "cross_entropy z_loss": (lambda: ops.cross_entropy(t(2, 5), ids[0, :2], z_loss=-1.0), ValueError, "'z_loss'=-1.0"),
    "linear_cross_entropy weight": (lambda: ops.linear_cross_entropy(t(2, 4), t(9, 3), ids[0, :2]), ValueError,
                                    r"must be \(V, H=4\)"),
    "adamw lengths": (lambda: ops.adamw_step([t(2)], [t(2)], [t(2), t(2)], [t(2)], lr=1e-3, step=1), ValueError,
                      "'exp_avgs' has 2 tensors, 'params' has 1"),
    "adamw grad shape": (lambda: ops.adamw_step([t(2)], [t(3)], [t(2)], [t(2)], lr=1e-3, step=1), ValueError,
                         r"grads\[0\] shape \(3,\) != params\[0\] shape \(2,\)"),
    "adamw moment dtype": (lambda: ops.adamw_step([t(2)], [t(2)], [t(2, dtype=torch.bfloat16)], [t(2)], lr=1e-3,
                                                  step=1), TypeError, r"exp_avgs\[0\] has dtype bfloat16, expected float32"),
    "adamw integer grad": (lambda: ops.adamw_step([t(2)], [torch.ones(2, dtype=torch.int64)], [t(2)], [t(2)], lr=1e-3,
                                                  step=1), TypeError,
                           r"grads\[0\] has dtype int64, expected a floating-point dtype"),
    "adamw master shape": (lambda: ops.adamw_step([t(2)], [t(2)], [t(2)], [t(2)], lr=1e-3, step=1,
                                                  master_params=[t(3)]), ValueError, r"master_params\[0\] shape \(3,\)"),
    "adamw moment device": (lambda: ops.adamw_step([t(2)], [t(2)], [t(2)], [t(2, device="meta")], lr=1e-3, step=1),
                            ValueError, r"exp_avg_sqs\[0\] is on meta, params\[0\] on cpu"),
    "unscale found_inf dtype": (lambda: ops.unscale_and_check_([t(2)], 1.0, t(1, dtype=torch.float16)), TypeError,
                                "'found_inf' has dtype float16"),
    "unscale found_inf size": (lambda: ops.unscale_and_check_([t(2)], 1.0, t(2)), ValueError, "exactly one element"),
    "loss scale tracker": (lambda: ops.update_loss_scale_(t(1), t(1), t(1)), TypeError,
                           "'growth_tracker' has dtype float32"),
    # inputs each op's fast path (validate.floats_on + shapes) must hand to the full checks
    "layer_norm 0-dim x": (lambda: ops.layer_norm(torch.zeros(()), torch.zeros(())), ValueError, "'x' must have at least 1 dims"),
    "layer_norm 2-d weight": (lambda: ops.layer_norm(t(3, 8), t(1, 8)), ValueError, "'weight' must have 1 dims"),
    "layer_norm bias device": (lambda: ops.layer_norm(t(3, 8), t(8), t(8, device="meta")), ValueError,
                               "'bias' is on meta, expected cpu"),
    "rms_norm residual dtype": (lambda: ops.rms_norm(t(3, 8), t(8), residual=t(3, 8, dtype=torch.int32)), TypeError,
                                "'residual' has dtype int32"),
    "swiglu up device": (lambda: ops.swiglu(t(2, 3), t(2, 3, device="meta")), ValueError, "'up' is on meta"),
    "rope batched cos": (lambda: ops.rope(t(2, 2, 3, 4), t(2, 2, 3, 4), t(1, 3, 2), t(1, 3, 2)), ValueError,
                         r"'cos' has shape \(1, 3, 2\), expected \(2, 3, 2\)"),
    "rope sin shape": (lambda: ops.rope(t(1, 2, 3, 4), t(1, 2, 3, 4), t(3, 2), t(2, 3, 2)), ValueError,
                       "'sin' has shape"),
    "softmax int": (lambda: ops.softmax(t(2, 3, dtype=torch.int64)), TypeError, "'x' has dtype int64"),
    "linear bias": (lambda: ops.linear(t(2, 3), t(4, 3), t(3)), ValueError, r"'bias' has shape \(3,\), expected \(4,\)"),
    "attention doc_ids device": (lambda: ops.attention(q4, kv4, kv4, doc_ids=ids.to("meta")), ValueError,
                                 "'doc_ids' is on meta"),
    "cross_entropy target device": (lambda: ops.cross_entropy(t(2, 5), ids[0, :2].to("meta")), ValueError,
                                    "'target' is on meta"),
    "linear_cross_entropy bias": (lambda: ops.linear_cross_entropy(t(2, 4), t(9, 4), ids[0, :2], t(8)), ValueError,
                                  r"'bias' has shape \(8,\), expected \(9,\)"),
    # outside autocast a GEMM's operands share one dtype (F.linear raised "expected m1 and m2 to have the
    # same dtype" from inside; the cpu backend's linear_cross_entropy computed the mix)
    "linear weight dtype": (lambda: ops.linear(t(2, 3), t(4, 3, dtype=torch.bfloat16)), TypeError,
                            "'weight' has dtype bfloat16, expected float32 \\(the dtype of 'x'\\)"),
    "linear bias dtype": (lambda: ops.linear(t(2, 3), t(4, 3), t(4, dtype=torch.bfloat16)), TypeError,
                          "'bias' has dtype bfloat16"),
    "linear_cross_entropy weight dtype": (lambda: ops.linear_cross_entropy(t(2, 4), t(9, 4, dtype=torch.bfloat16),
                                                                           ids[0, :2]), TypeError,
                                          "'weight' has dtype bfloat16, expected float32 \\(the dtype of 'hidden'\\)"),
    # integer arguments: the cpu kernel truncated window=1.5 to 1, the Triton op schema refused it; a bool is no size
    "attention float window": (lambda: ops.attention(q4, kv4, kv4, window=1.5), ValueError,
                               "'window'=1.5 must be an integer, got float"),
    "attention bool window": (lambda: ops.attention(q4, kv4, kv4, window=True), ValueError,
                              "'window'=True must be an integer, got bool"),
    "cross_entropy float ignore_index": (lambda: ops.cross_entropy(t(2, 5), ids[0, :2], ignore_index=-100.0),
                                         ValueError, "'ignore_index'=-100.0 must be an integer"),
    "linear_cross_entropy float ignore_index": (lambda: ops.linear_cross_entropy(t(2, 4), t(9, 4), ids[0, :2],
                                                                                 ignore_index=0.5), ValueError,
                                                "'ignore_index'=0.5 must be an integer"),
    "loss scale float growth_interval": (lambda: ops.update_loss_scale_(t(1), t(1, dtype=torch.int32), t(1),
                                                                        growth_interval=2.5), ValueError,
                                         "'growth_interval'=2.5 must be an integer"),
    # the loss-scaling scalars: the kernels read element 0 of each and ignored the rest
    "adamw found_inf size": (lambda: ops.adamw_step([t(2)], [t(2)], [t(2)], [t(2)], lr=1e-3, step=1,
                                                    found_inf=t(2)), ValueError,
                             r"'found_inf' must have exactly one element, got shape \(2,\)"),
    "loss scale found_inf dtype": (lambda: ops.update_loss_scale_(t(1), t(1, dtype=torch.int32),
                                                                  t(1, dtype=torch.int32)), TypeError,
                                   "'found_inf' has dtype int32, expected one of float32"),
    "loss scale found_inf size": (lambda: ops.update_loss_scale_(t(1), t(1, dtype=torch.int32), t(2)), ValueError,
                                  "'found_inf' must have exactly one element"),
    "loss scale scale size": (lambda: ops.update_loss_scale_(t(2), t(2, dtype=torch.int32), t(1)), ValueError,
                              "'scale' must have exactly one element"),
    "loss scale tracker size": (lambda: ops.update_loss_scale_(t(1), t(2, dtype=torch.int32), t(1)), ValueError,
                                "'growth_tracker' must have exactly one element"),
    # a parameter without a gradient: AttributeError / TypeError from deep inside
    "adamw None grad": (lambda: ops.adamw_step([t(2), t(3)], [t(2), None], [t(2), t(3)], [t(2), t(3)], lr=1e-3,
                                               step=1), TypeError,
                        r"argument 'grads\[1\]' must be a torch.Tensor, got NoneType"),
    "adamw None param": (lambda: ops.adamw_step([None], [t(2)], [t(2)], [t(2)], lr=1e-3, step=1), TypeError,
                         r"argument 'params\[0\]' must be a torch.Tensor, got NoneType"),
    "unscale None grad": (lambda: ops.unscale_and_check_([t(2), None], 1.0, t(1)), TypeError,
                          r"argument 'grads\[1\]' must be a torch.Tensor, got NoneType"),
    "unscale inv_scale size": (lambda: ops.unscale_and_check_([t(2)], t(2), t(1)), ValueError,
                               "'inv_scale' must have exactly one element"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_the_argument(case):
    fn, exc, message = CASES[case]
    with pytest.raises(exc, match=message) as info:
        fn()
    text = str(info.value)
    assert text.startswith("pyllm.ops.") and "\n" not in text


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gemm_operands_of_two_dtypes_are_taken_under_autocast(backend):
    # autocast casts both operands to its dtype, so the dtype check above applies outside it only
    x, w, target = t(3, 4), t(5, 4, dtype=torch.bfloat16), torch.tensor([0, 4, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(x, w, backend=backend).dtype == torch.bfloat16
        assert torch.isfinite(ops.linear_cross_entropy(x, w, target, backend=backend))


def _available(backend):
    if ops.backends()[backend] != "available":
        pytest.skip(f"{backend} backend {ops.backends()[backend]}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("bad", [5, -1, -7])
def test_target_out_of_range_is_refused_on_every_backend(op, bad, backend, monkeypatch):
    # V=5: the reference raised an IndexError-like RuntimeError from inside, the Triton kernel read the
    # neighbouring logits; a target equal to ignore_index (also outside [0, V)) is fine
    _available(backend)
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")
    x = torch.randn(3, 5)

    def run(target):
        if op == "cross_entropy":
            return ops.cross_entropy(x, target, ignore_index=-100, backend=backend)
        return ops.linear_cross_entropy(x, torch.eye(5), target, ignore_index=-100, backend=backend)

    with pytest.raises(ValueError, match=rf"pyllm.ops.{op}: argument 'target' holds class indices outside "
                                         rf"\[0, 5\) that are not ignore_index=-100"):
        run(torch.tensor([0, bad, 1]))
    assert torch.isfinite(run(torch.tensor([0, -100, 4])))
