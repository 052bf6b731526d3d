"""Run by test_distributed.py under torchrun: the ``netslim`` command, then each rank's
final weights saved, so the test can compare the ranks.

Usage: ``torchrun ... torchrun_worker.py DUMP_DIR NETSLIM_ARGS...``. With ``FAIL_AT=R:E``
in the environment, rank R crashes as epoch E (0-based) begins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from netslim import cli, recipes
from netslim.runtime import distributed


def main() -> int:
    dump, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = distributed.rank_from_env()
    trained = []
    wrap = distributed.wrap_model

    def wrap_and_remember(model, sync_bn=False):
        trained.append(model)  # the module fit trains and saves
        return wrap(model, sync_bn)

    distributed.wrap_model = wrap_and_remember
    if "FAIL_AT" in os.environ:
        fail_rank, fail_epoch = map(int, os.environ["FAIL_AT"].split(":"))
        lr_at = recipes.lr_at

        def crash(epoch, base_lr, epochs):
            if rank == fail_rank and epoch == fail_epoch:
                raise RuntimeError(f"simulated crash of rank {rank}")
            return lr_at(epoch, base_lr, epochs)

        recipes.lr_at = crash  # lr_at_step looks it up on every call
    code = cli.main(argv)
    if trained:
        torch.save(trained[-1].state_dict(), dump / f"rank{rank}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main())
