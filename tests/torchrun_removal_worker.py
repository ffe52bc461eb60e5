"""Worker for tests/test_distributed.py, run under ``torchrun``: one launch, two LN removals (DDP, then
FSDP), so the slow process start-up is paid once.

    python -m torch.distributed.run --standalone --nproc_per_node=2 torchrun_removal_worker.py RUN CORPUS OUT RC_JSON

Writes OUT/ddp and OUT/fsdp (the removal results, from rank 0) and OUT/held-<mode>-rank<r>.json: for each
fine-tune of that removal (the LN removal, then the control), what this rank's optimizer held per
parameter just after its first step — read here because only the worker can see its own shard.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

import workbench.removal.finetune as finetune
from workbench.removal import RemovalConfig, remove_ln


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's piece only


def _record_first_step(held: list) -> None:
    """Wrap the fine-tune's optimizer factory so that each optimizer reports, after its first step,
    the elements and bytes this rank stores for every parameter, its gradient and its Adam state."""
    make = finetune._optimizer

    def optimizer(module, rc, lr):
        opt = make(module, rc, lr)
        names = {id(p): n for n, p in module.named_parameters()}

        def after_step(opt, args, kwargs):
            params = []
            for group in opt.param_groups:
                for p in group["params"]:
                    state = [_local(s) for s in opt.state[p].values() if hasattr(s, "dim") and s.dim() > 0]
                    params.append({
                        "name": names[id(p)],
                        "shape": list(p.shape),  # the full parameter's (a DTensor reports its global shape)
                        "local_numel": _local(p).numel(),
                        "storage_bytes": _local(p).untyped_storage().nbytes(),
                        "element_bytes": p.element_size(),
                        "grad_numel": _local(p.grad).numel() if p.grad is not None else None,
                        "state_numel": [s.numel() for s in state],
                        "sharded": hasattr(p, "to_local"),
                    })
            held.append(params)
            handle.remove()

        handle = opt.register_step_post_hook(after_step)
        return opt

    finetune._optimizer = optimizer


def main() -> None:
    run, corpus, out, rc = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    for mode in ("ddp", "fsdp"):
        held: list = []
        made = finetune._optimizer
        _record_first_step(held)
        try:
            remove_ln(run, out / mode, RemovalConfig.of(**rc, fsdp=mode == "fsdp"), corpus=corpus, progress=False)
        finally:
            finetune._optimizer = made
        rank = dist.get_rank()
        (out / f"held-{mode}-rank{rank}.json").write_text(json.dumps({"world": dist.get_world_size(), "fits": held}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
