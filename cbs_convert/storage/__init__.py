"""Reading and writing files: source checkpoints, diffusers folders, the routed file, its schema, atomic writes, the work directory."""
