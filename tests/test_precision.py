"""One precision rule on every path: parameters are fp32 masters, bf16 autocast computes the matmuls and
convolutions, and what flows between blocks (residual stream, conditioning) is what autocast makes of
it -- the same whether one rank trains the plain module or FSDP2 shards it (parallel.py). A forward
hook on the first block compares the two paths."""

import pytest
import torch

from archirf import parallel
from archirf.config import load_config

FAMILIES = {
    "dit": ["model.name=dit", "model.depth=2", "model.hidden_size=64", "model.num_heads=2"],
    "mmdit": ["model.name=mmdit", "model.depth=1", "model.depth_single_blocks=1", "model.hidden_size=64",
              "model.num_heads=2"],
    "adm_unet": ["model.name=adm_unet", "model.channels=32", "model.num_res_blocks=1"],
    "edm2_unet": ["model.name=edm2_unet", "model.channels=32", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
                  "model.channels_per_head=32"],
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _first_block_io(overrides: list[str], shard: bool, device: str,
                    precision: str | None = "bf16") -> tuple[list, torch.Tensor]:
    cfg = load_config(None, overrides + ([f"precision={precision}"] if precision else []) + [
        "compile=off", f"device={device}", f"parallel.shard_single_rank={str(shard).lower()}"])
    seen = {}
    with parallel.distributed(cfg) as env:
        model, _ = parallel.build_training_model(cfg, env, param_dtype=torch.bfloat16, compile=False)
        assert parallel.uses_fsdp(cfg, env) == shard

        def hook(module, args, output):
            seen["inputs"] = [a.dtype for a in args if isinstance(a, torch.Tensor)]
            seen["values"] = [a.detach().float().cpu() for a in args if isinstance(a, torch.Tensor)]
            out = output[0] if isinstance(output, tuple) else output
            seen["output"] = (out.dtype, out.detach().float().cpu())

        handle = model.blocks[0].register_forward_hook(hook)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=gen)
        t, y = torch.rand(4, generator=gen), torch.tensor([0, 1, 2, 10])
        x, t, y = x.to(env.device), t.to(env.device), y.to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16):
            final = model(x, t, y)
        handle.remove()
    return seen, final.detach().float().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_rank_and_fsdp_compute_at_the_same_precision(family, device):
    plain, plain_out = _first_block_io(FAMILIES[family], shard=False, device=device)
    sharded, sharded_out = _first_block_io(FAMILIES[family], shard=True, device=device)
    assert plain["inputs"] == sharded["inputs"], (plain["inputs"], sharded["inputs"])
    assert plain["output"][0] == sharded["output"][0]
    for a, b in zip(plain["values"] + [plain["output"][1], plain_out], sharded["values"] + [sharded["output"][1],
                                                                                            sharded_out]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
