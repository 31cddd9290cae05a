"""What a recipe deploys as, shared by the export stage (which writes it) and eval (which runs it):
packing weights into ModelOpt's unified HF format and back (packing, unified), the amax each
packed linear needs (amax), and torchao-quantized HF checkpoints (torchao)."""
