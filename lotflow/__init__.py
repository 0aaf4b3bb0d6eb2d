"""lotflow: the reliability layer between a plant's shop floor and its ERP."""

from lotflow.compiled import use_compiled_core

# before any module of the core is imported: compiled where built from the current sources
use_compiled_core()
