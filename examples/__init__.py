"""Examples of gradvac_dist: short scripts to copy (run them as files) and ``demo/``, the main job
(``python -m examples.demo``, what ``bash launch/demo.sh`` runs)."""
