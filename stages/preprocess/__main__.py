from stages.preprocess.core import run
from stages.runtime import stage_main

stage_main(run)
