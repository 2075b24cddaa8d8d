"""ITC across 2 CPU processes (gloo) equals one process holding the whole batch: loss and gradients.

The rule under test (ibkit.models.blip2_losses): each rank's loss is the mean over its local rows, DDP
averages the gradients, and with unequal local batches each rank's loss is scaled by
world * local_rows / global_rows.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny_blip2 import caption_batch, tiny_stage1

from ibkit.models.blip2_losses import itc_loss

WORLD = 2
SIZES = (3, 1)  # unequal local batches for the plain loss
MODEL_BATCH = 4  # 2 + 2 for the whole model


def _features(seed: int = 0):
    """A small differentiable producer of ITC features and its inputs."""
    torch.manual_seed(seed)
    image_net = torch.nn.Linear(5, 3 * 4)
    text_net = torch.nn.Linear(5, 4)
    temp = torch.nn.Parameter(torch.tensor(0.1))
    g = torch.Generator().manual_seed(7)
    x_img, x_txt = torch.randn(sum(SIZES), 5, generator=g), torch.randn(sum(SIZES), 5, generator=g)
    return image_net, text_net, temp, x_img, x_txt


def _itc_run(rows: slice, scale: float, with_grad: bool):
    image_net, text_net, temp, x_img, x_txt = _features()
    image = F.normalize(image_net(x_img[rows]).view(-1, 3, 4), dim=-1)
    text = F.normalize(text_net(x_txt[rows]), dim=-1)
    out = itc_loss(image, text, temp, gather_with_grad=with_grad)
    (out.loss * scale).backward()
    params = [*image_net.parameters(), *text_net.parameters(), temp]
    return out.loss.detach() * scale, [p.grad.clone() for p in params]


def _model_run(rows: slice, scale: float):
    model = tiny_stage1().eval()  # no dropout: the processes must compute the same function
    batch = {k: v[rows] for k, v in caption_batch(MODEL_BATCH).items()}
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    (out.loss_itc * scale).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
             if p.requires_grad}
    return out.loss_itc.detach() * scale, grads


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / WORLD


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        scale = WORLD * SIZES[rank] / sum(SIZES)
        result = {}
        for with_grad in (True, False):
            loss, grads = _itc_run(rows, scale, with_grad)
            result[f"itc_{with_grad}"] = (_mean_over_ranks(loss), [_mean_over_ranks(g) for g in grads])
        half = MODEL_BATCH // WORLD
        loss, grads = _model_run(slice(rank * half, (rank + 1) * half), 1.0)
        result["model"] = (_mean_over_ranks(loss), {n: _mean_over_ranks(g) for n, g in grads.items()})
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_itc_two_processes_equal_one_process(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    ddp = torch.load(out_file, weights_only=False)

    loss, grads = _itc_run(slice(None), 1.0, True)
    ddp_loss, ddp_grads = ddp["itc_True"]
    torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-6)
    for got, ref in zip(ddp_grads, grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)

    # LAVIS's no-grad gather: the same loss, but not the whole-batch gradient
    nograd_loss, nograd_grads = ddp["itc_False"]
    torch.testing.assert_close(nograd_loss, loss, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(g, r, atol=1e-6) for g, r in zip(nograd_grads, grads))

    # the whole stage-1 model: its ITC loss and every parameter's gradient
    loss, grads = _model_run(slice(None), 1.0)
    ddp_loss, ddp_grads = ddp["model"]
    torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(ddp_grads) == set(grads)
    moved = 0
    for name, ref in grads.items():
        torch.testing.assert_close(ddp_grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)
        moved += int(ref.abs().sum() > 0)
    assert moved > 10  # the ITC gradient reaches the Q-Former, queries, projections, ln_vision, temperature
