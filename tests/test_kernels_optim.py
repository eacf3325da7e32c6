"""archirf_kernels.adamw_ema_step (kernels/optim.py): the one-pass AdamW + EMAs against its float64 spec
(reference.adamw_ema_step run on float64 copies) and the spec against torch.optim.AdamW + torch.lerp; odd
sizes (chunk tails, a 1-element and an empty tensor, more chunks than one per tensor), weight decay, the
clipping scale, 0 to 4 EMAs, several steps (bias correction), and the argument checks. In Triton's
interpreter on a CPU (chunks of 64 elements), on CUDA where there is a GPU."""

import pytest
import torch

import archirf_kernels as K
from archirf_kernels import optim, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 5), (130,), (1,), (0,), (64,), (2, 3, 33)]
HP = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)


def _state(seed, shapes=SHAPES, emas=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda scale=1.0, pos=False: [((torch.rand if pos else torch.randn)(s, generator=gen) * scale).to(dtype)
                                       for s in shapes]
    return dict(params=mk(), grads=mk(0.1), exp_avgs=mk(0.01), exp_avg_sqs=mk(1e-3, pos=True),
                emas=[mk() for _ in range(emas)])


def _to(state, device, dtype=None):
    conv = lambda t: t.to(device=device, dtype=dtype or t.dtype).clone()
    return {k: ([[conv(t) for t in e] for e in v] if k == "emas" else [conv(t) for t in v]) for k, v in state.items()}


@pytest.mark.parametrize("num_emas", [0, 1, 4])
@pytest.mark.parametrize("with_scale", [False, True], ids=["no-scale", "scale"])
def test_matches_float64_spec_over_steps(num_emas, with_scale):
    state = _state(0, emas=num_emas)
    ours, ref = _to(state, DEVICE), _to(state, "cpu", torch.float64)
    rates = [0.5, 0.1, 1.0, 0.0][:num_emas]       # 1: a copy of the weights; 0: frozen
    for n in range(1, 4):                          # the bias correction changes with the step
        step = torch.tensor(float(n), device=DEVICE)
        scale = torch.tensor(0.37, device=DEVICE) if with_scale else None
        K.adamw_ema_step(ours["params"], ours["grads"], ours["exp_avgs"], ours["exp_avg_sqs"], step, **HP,
                         emas=ours["emas"], ema_rates=rates, grad_scale=scale, impl="triton")
        reference.adamw_ema_step(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], float(n), **HP,
                                 emas=ref["emas"], ema_rates=rates,
                                 grad_scale=torch.tensor(0.37, dtype=torch.float64) if with_scale else None)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(ours[key], ref[key]):
            torch.testing.assert_close(a.cpu().double(), b, rtol=2e-6, atol=1e-7, msg=key)
    for e_ours, e_ref in zip(ours["emas"], ref["emas"]):
        for a, b in zip(e_ours, e_ref):
            torch.testing.assert_close(a.cpu().double(), b, rtol=2e-6, atol=1e-7)


def test_spec_is_torch_adamw_then_lerp():
    # the spec against torch's own AdamW (single-tensor path) and torch.lerp, in float64, from torch's initial
    # state (zero moments) over three steps
    state = _to(_state(1, emas=1), "cpu", torch.float64)
    params = [torch.nn.Parameter(p.clone()) for p in state["params"]]
    opt = torch.optim.AdamW(params, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    ema = [p.detach().clone() for p in params]
    spec = _to(state, "cpu")
    spec["exp_avgs"] = [torch.zeros_like(p) for p in spec["params"]]
    spec["exp_avg_sqs"] = [torch.zeros_like(p) for p in spec["params"]]
    spec["emas"] = [[p.clone() for p in state["params"]]]
    half = torch.tensor(0.5, dtype=torch.float64)
    for n in range(1, 4):
        for p, g in zip(params, state["grads"]):
            p.grad = g * half
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 0.25)
        reference.adamw_ema_step(spec["params"], spec["grads"], spec["exp_avgs"], spec["exp_avg_sqs"], n, **HP,
                                 emas=spec["emas"], ema_rates=[0.25], grad_scale=half)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), spec["params"][i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ema[i], spec["emas"][0][i], rtol=1e-12, atol=1e-14)
        if p.numel():
            torch.testing.assert_close(opt.state[p]["exp_avg"], spec["exp_avgs"][i], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], spec["exp_avg_sqs"][i], rtol=1e-12, atol=1e-14)


def test_many_chunks_per_tensor_and_the_table_cache(monkeypatch):
    monkeypatch.setattr(optim, "INTERPRETER_BLOCK", 16)
    monkeypatch.setattr(optim, "BLOCK", 16)
    optim._CHUNKS.clear()
    shapes = [(50,), (16,), (17,), (3, 11)]
    for seed in (2, 3):     # the second call reuses the cached chunk table (same sizes) with new addresses
        state = _state(seed, shapes=shapes, emas=1)
        ours, ref = _to(state, DEVICE), _to(state, "cpu", torch.float64)
        K.adamw_ema_step(ours["params"], ours["grads"], ours["exp_avgs"], ours["exp_avg_sqs"],
                         torch.tensor(5.0, device=DEVICE), **HP, emas=ours["emas"], ema_rates=[0.3], impl="triton")
        reference.adamw_ema_step(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], 5.0, **HP,
                                 emas=ref["emas"], ema_rates=[0.3])
        for a, b in zip(ours["params"] + ours["emas"][0], ref["params"] + ref["emas"][0]):
            torch.testing.assert_close(a.cpu().double(), b, rtol=2e-6, atol=1e-7)
    assert len(optim._CHUNKS) == 1
    tensor, start, sizes = next(iter(optim._CHUNKS.values()))
    assert tensor.tolist() == [0, 0, 0, 0, 1, 2, 2, 3, 3, 3] and start.tolist()[:4] == [0, 16, 32, 48]


@pytest.mark.parametrize("bad,match", [
    (lambda s: s["grads"].pop(), "one tensor per parameter"),
    (lambda s: s["grads"].__setitem__(0, s["grads"][0].half()), "contiguous fp32 tensor"),
    (lambda s: s["exp_avgs"].__setitem__(0, s["exp_avgs"][0].t()), "contiguous fp32 tensor"),
    (lambda s: s["emas"][0].__setitem__(1, torch.zeros(7)), r"shaped and placed like its parameter"),
])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_argument_checks_on_both_paths(bad, match, impl):
    state = _to(_state(4, emas=1), DEVICE)
    bad(state)
    with pytest.raises(ValueError, match=match):
        K.adamw_ema_step(state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"],
                         torch.tensor(1.0, device=DEVICE), **HP, emas=state["emas"], ema_rates=[0.1], impl=impl)


def test_rates_and_ema_count_are_checked():
    state = _to(_state(5, emas=1), DEVICE)
    call = lambda **k: K.adamw_ema_step(state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"],
                                        torch.tensor(1.0, device=DEVICE), **HP, **k)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        call(emas=state["emas"], ema_rates=[1.5])
    with pytest.raises(ValueError, match="one rate per EMA, at most 4 EMAs"):
        call(emas=state["emas"] * 5, ema_rates=[0.1] * 5)


def test_per_parameter_step_counts_and_the_aligned_path(monkeypatch):
    # torch keeps one count per parameter: a parameter that got its first gradient later has a smaller count and
    # its own bias correction; sizes that are multiples of 4 take the kernel's aligned (vector) path
    calls = []
    launch = optim._adamw_ema_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*a, **k):
                calls.append(k["ALIGNED"])
                return launch[grid](*a, **k)
            return run

    monkeypatch.setattr(optim, "_adamw_ema_kernel", Spy())
    shapes = [(8, 4), (16,), (4, 3)]
    state = _state(6, shapes=shapes, emas=1)
    ours, ref = _to(state, DEVICE), _to(state, "cpu", torch.float64)
    counts = [7.0, 2.0, 1.0]
    K.adamw_ema_step(ours["params"], ours["grads"], ours["exp_avgs"], ours["exp_avg_sqs"],
                     [torch.tensor(c, device=DEVICE) for c in counts], **HP, emas=ours["emas"], ema_rates=[0.2],
                     impl="triton")
    for i, c in enumerate(counts):      # the spec, one parameter at a time with its own count
        sub = {k: ([[e[i]] for e in v] if k == "emas" else [v[i]]) for k, v in ref.items()}
        reference.adamw_ema_step(sub["params"], sub["grads"], sub["exp_avgs"], sub["exp_avg_sqs"], c, **HP,
                                 emas=sub["emas"], ema_rates=[0.2])
    for a, b in zip(ours["params"] + ours["exp_avgs"], ref["params"] + ref["exp_avgs"]):
        torch.testing.assert_close(a.cpu().double(), b, rtol=2e-6, atol=1e-7)
    assert calls == [True]          # fresh allocations are 16-byte aligned, and every size is a multiple of 4
