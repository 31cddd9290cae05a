from stages.preload.child import become_stage
from stages.preload.server import serve_from_argv

if __name__ == "__main__":
    child = serve_from_argv()  # returns only in a forked child, with what it is to run
    if child is not None:
        become_stage(child)  # runs the stage's module; the interpreter exits as `python -m` would
