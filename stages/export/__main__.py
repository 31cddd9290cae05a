from stages.export.core import run
from stages.runtime import stage_main

if __name__ == "__main__":
    stage_main(run)
