"""The contract between the planes: what the control plane (pipeline/) hands a stage (stages/) and
how a stage answers. Both planes import it; it imports neither, and never torch.

- spec: the stage spec (typed params, the recipe by value) and where it lives
- markers, files: `_SUCCESS` (with its outputs' hashes) / `_FAILED`, atomic writes
- params: each stage kind's typed parameters; kinds: the stage kinds and their code
- recipe, compat, formats: precision recipes, what each backend can run, the number formats
- tracking: the event format of a stage's MLflow record and its delivery
- launch: the one command that starts a stage, on every backend
"""
