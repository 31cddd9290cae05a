"""`python -m stages.train --spec spec.json` (also under `torchrun --nproc-per-node N`)."""

from stages.runtime import stage_main
from stages.train.core import run

stage_main(run)
