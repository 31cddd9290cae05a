"""What a recipe deploys as, shared by the export stage (which writes it) and eval (which runs it):
packing weights into ModelOpt's unified HF format and back (packing, unified), the amax each
packed linear needs (amax), torchao-quantized HF checkpoints (torchao), and the export's record
(export_record: `export.json`)."""
