"""The probe fit's progress hook (vitdecomp.probes.fit_probes, scores.functions.fit_text_probes)."""

from __future__ import annotations

import torch

import vitdecomp.scores.functions as functions
from vitdecomp.probes import fit_probes


def _data(n: int = 120, d: int = 6, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 2.0 * torch.nn.functional.one_hot(y, d).float()
    return x, y


def test_fit_probes_reports_every_evaluation_and_fits_the_same_probe():
    x, y = _data()
    seen: list[int] = []
    with torch.enable_grad():
        hooked = fit_probes(x[None], y, 3, on_evaluation=seen.append)
        plain = fit_probes(x[None], y, 3)
    assert len(seen) > 1 and seen == list(range(1, len(seen) + 1))
    assert torch.equal(hooked.weight, plain.weight) and torch.equal(hooked.bias, plain.bias)


def test_text_probe_bar_names_the_evaluation_under_way(monkeypatch):
    """A long fit is not silent: the bar's postfix names the L-BFGS evaluation (redrawn at most every
    second; here every evaluation)."""
    x, y = _data()
    said: list[str] = []
    monkeypatch.setattr("vitdecomp.progress.REDRAW_S", 0.0)
    monkeypatch.setattr(functions.tqdm, "set_postfix_str", lambda self, s, refresh=True: said.append(s))
    readings = {"a": torch.nn.functional.one_hot(y, 3).float()}
    out = functions.fit_text_probes(x, readings, progress=True)
    assert torch.equal(out["a"][1], y)
    assert said and said[0] == "L-BFGS evaluation 1" and said[-1].startswith("L-BFGS evaluation ")


def test_streamed_text_probe_fits_with_the_scoring_bar(monkeypatch):
    """The streamed ``text_probe`` fits its probes between the passes with the caller's ``progress``
    (so the fit's bar, and its L-BFGS evaluations, show in ``analyze``)."""
    import vitdecomp.scores.streamed as streamed

    x, y = _data()
    asked: list[bool] = []
    real = streamed.fit_text_probes

    def fit(whole, readings, progress=False):
        asked.append(progress)
        return real(whole, readings, progress=progress)

    monkeypatch.setattr(streamed, "fit_text_probes", fit)
    sums = streamed.TextProbeSums(["a"], n=len(y))
    sums.wholes, sums.readings = [x.double()], {"a": [torch.nn.functional.one_hot(y, 3).double()]}
    sums.total = torch.zeros(1, x.shape[1], dtype=torch.float64)
    sums.end_pass(0, progress=True)
    assert asked == [True] and torch.equal(sums.probes["a"][1], y)
